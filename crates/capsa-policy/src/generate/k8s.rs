//! Kubernetes YAML: Pods and the workload kinds that template them, with
//! the ConfigMaps and Secrets their environment refers to taken from the
//! same input. ConfigMap values are pinned; Secret values are not (the
//! policy is public), only the variable's presence. The policy goes back as
//! the pod template's initdata annotation, base64 of the initdata TOML.
//!
//! A pod template may restrict the workload API its containers may use
//! with the annotation `capsa.dev/workload-api`: endpoint names separated by
//! commas (`status, key/release`), or `none`. Without it, the policy allows
//! every endpoint.
//!
//! A pod volume of the CSI driver `encfs.capsa.dev` is an encrypted
//! filesystem (a capsa-encfs image) the agent mounts at
//! `/run/capsa/encfs/<volume name>` before any container starts:
//!
//! ```yaml
//! volumes:
//! - name: data                 # 1-63 of a-z, 0-9 and - (not first)
//!   csi:
//!     driver: encfs.capsa.dev
//!     readOnly: true           # optional, default false
//!     volumeAttributes:
//!       url: http://127.0.0.1:10000/devstoreaccount1/images/data   # the image's prefix
//!       key: data-key          # its key in the first --trust service's key broker
//! ```
//!
//! The volume goes into that pod's initdata (so HOST_DATA measures where
//! the image is and which key opens it), and a container's `volumeMount` of
//! it is a bind mount of exactly that path, `ro` when the mount or the
//! volume is read-only (a read-only volume is read-only in every container,
//! whatever its mount says). `subPath` is not supported on these volumes.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::settings::Settings;
use super::spec::{ContainerSpec, EnvSpec, Platform, VolumeSource, Workload};
use super::{
    FieldCheck, GenerateError, Generated, GeneratedWorkload, ImageResolver, Options, base64, required_str, string_list,
    volume_mount,
};
use crate::document::{DocumentError, ENCFS_MOUNT_ROOT, EncfsVolume, SandboxSettings};
use crate::model::WORKLOAD_API_ENDPOINTS;

/// The annotation Confidential Containers reads initdata from.
pub const INITDATA_ANNOTATION: &str = "io.katacontainers.config.hypervisor.cc_init_data";
/// The pod annotation listing the workload API endpoints the pod's
/// containers may use (see the module documentation).
pub const WORKLOAD_API_ANNOTATION: &str = "capsa.dev/workload-api";
/// The CSI driver name of a pod volume that is an encrypted filesystem
/// (see the module documentation).
pub const ENCFS_CSI_DRIVER: &str = "encfs.capsa.dev";

const POD_SPEC_KEYS: &[&str] = &[
    "containers",
    "initContainers",
    "volumes",
    "securityContext",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "dnsPolicy",
    "dnsConfig",
    "nodeSelector",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "nodeName",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "hostname",
    "subdomain",
    "affinity",
    "schedulerName",
    "tolerations",
    "priorityClassName",
    "priority",
    "runtimeClassName",
    "imagePullSecrets",
    "enableServiceLinks",
    "topologySpreadConstraints",
    "preemptionPolicy",
    "readinessGates",
    "setHostnameAsFQDN",
];
const POD_SECURITY_KEYS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "supplementalGroups",
    "fsGroup",
    "fsGroupChangePolicy",
    "sysctls",
    "seccompProfile",
];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "envFrom",
    "workingDir",
    "ports",
    "resources",
    "volumeMounts",
    "securityContext",
    "imagePullPolicy",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "stdin",
    "stdinOnce",
    "tty",
    "restartPolicy",
];
const CONTAINER_SECURITY_KEYS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
    "seccompProfile",
];
const VOLUME_MOUNT_KEYS: &[&str] = &["name", "mountPath", "readOnly", "mountPropagation"];
const ENCFS_CSI_KEYS: &[&str] = &["driver", "readOnly", "volumeAttributes"];
const ENCFS_ATTRIBUTE_KEYS: &[&str] = &["url", "key"];
const ENV_KEYS: &[&str] = &["name", "value", "valueFrom"];

/// ConfigMaps and Secrets of the input, by name, as decoded strings.
#[derive(Default)]
struct ConfigSources {
    config_maps: HashMap<String, BTreeMap<String, String>>,
    secrets: HashMap<String, BTreeMap<String, String>>,
}

/// Parses every YAML document of the input.
fn documents(origin: &str, text: &str) -> Result<Vec<Value>, GenerateError> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)
            .map_err(|e| GenerateError::Parse { origin: origin.to_owned(), reason: e.to_string() })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Generates a policy for every workload in a Kubernetes YAML input.
pub fn generate(
    origin: &str,
    text: &str,
    resolver: &mut dyn ImageResolver,
    settings: &Settings,
    options: &Options,
) -> Result<Generated, GenerateError> {
    let mut docs = documents(origin, text)?;
    let sources = config_sources(&docs)?;
    let mut workloads = Vec::new();
    for doc in &mut docs {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("unnamed").to_owned();
        let template_pointer = match kind.as_str() {
            "Pod" => "",
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template",
            "CronJob" => "/spec/jobTemplate/spec/template",
            _ => continue,
        };
        let path = format!("{kind}/{name}{}", template_pointer.replace('/', "."));
        let template = doc
            .pointer_mut(template_pointer)
            .ok_or_else(|| GenerateError::Invalid { path: path.clone(), reason: "has no pod template".into() })?;
        let spec = template
            .get("spec")
            .ok_or_else(|| GenerateError::Invalid { path: format!("{path}.spec"), reason: "missing".into() })?;
        let mut workload = pod(&format!("{path}.spec"), &name, spec, &sources, options)?;
        workload.workload_api = workload_api(&path, template)?;
        let data = super::build::build(&workload, resolver, settings)?;
        let generated = GeneratedWorkload::new(format!("{kind}/{name}"), data, &workload, &options.sandbox_settings)?;
        annotate(template, &generated)?;
        workloads.push(generated);
    }
    if workloads.is_empty() {
        return Err(GenerateError::NoWorkload(origin.to_owned()));
    }
    let mut annotated = String::new();
    for doc in &docs {
        let yaml = serde_norway::to_string(doc).map_err(|e| GenerateError::Parse {
            origin: origin.to_owned(),
            reason: format!("cannot write YAML back: {e}"),
        })?;
        annotated.push_str("---\n");
        annotated.push_str(&yaml);
    }
    Ok(Generated { workloads, annotated })
}

/// The endpoints the template's `capsa.dev/workload-api` annotation allows,
/// in [`WORKLOAD_API_ENDPOINTS`]' order (so the same set is the same
/// policy however it is written), or `None` without the annotation.
fn workload_api(path: &str, template: &Value) -> Result<Option<Vec<String>>, GenerateError> {
    let Some(value) =
        template.get("metadata").and_then(|m| m.get("annotations")).and_then(|a| a.get(WORKLOAD_API_ANNOTATION))
    else {
        return Ok(None);
    };
    let path = format!("{path}.metadata.annotations.\"{WORKLOAD_API_ANNOTATION}\"");
    let allowed = WORKLOAD_API_ENDPOINTS.join(", ");
    let usage = format!("list endpoints separated by commas, among: {allowed}; or write none");
    let text = value
        .as_str()
        .ok_or_else(|| GenerateError::Invalid { path: path.clone(), reason: format!("is not a string; {usage}") })?;
    if text.trim() == "none" {
        return Ok(Some(Vec::new()));
    }
    let mut named = Vec::new();
    for name in text.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(GenerateError::Invalid { path, reason: format!("has an empty endpoint name; {usage}") });
        }
        if !WORKLOAD_API_ENDPOINTS.contains(&name) {
            return Err(GenerateError::Invalid {
                path,
                reason: format!("names {name:?}, which is not a workload API endpoint; {usage}"),
            });
        }
        named.push(name);
    }
    Ok(Some(WORKLOAD_API_ENDPOINTS.iter().filter(|e| named.contains(e)).map(|e| (*e).to_owned()).collect()))
}

fn annotate(template: &mut Value, generated: &GeneratedWorkload) -> Result<(), GenerateError> {
    let invalid = || GenerateError::Invalid { path: "metadata".into(), reason: "is not an object".into() };
    let obj = template.as_object_mut().ok_or_else(invalid)?;
    let metadata = obj.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    let metadata = metadata.as_object_mut().ok_or_else(invalid)?;
    let annotations = metadata.entry("annotations").or_insert_with(|| Value::Object(Map::new()));
    let annotations = annotations.as_object_mut().ok_or_else(invalid)?;
    annotations.insert(INITDATA_ANNOTATION.into(), Value::String(base64(generated.initdata.toml().as_bytes())));
    Ok(())
}

fn config_sources(docs: &[Value]) -> Result<ConfigSources, GenerateError> {
    let mut sources = ConfigSources::default();
    for doc in docs {
        let kind = doc.get("kind").and_then(Value::as_str);
        let Some(name) = doc.pointer("/metadata/name").and_then(Value::as_str) else { continue };
        let strings = |v: Option<&Value>| -> BTreeMap<String, String> {
            v.and_then(Value::as_object)
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), scalar(v)?))).collect())
                .unwrap_or_default()
        };
        match kind {
            Some("ConfigMap") => {
                sources.config_maps.insert(name.to_owned(), strings(doc.get("data")));
            }
            Some("Secret") => {
                let mut data = BTreeMap::new();
                for (k, v) in strings(doc.get("data")) {
                    use base64::Engine as _;
                    let decoded = base64::engine::general_purpose::STANDARD.decode(v.trim()).map_err(|e| {
                        GenerateError::Invalid {
                            path: format!("Secret/{name}.data.{k}"),
                            reason: format!("not base64: {e}"),
                        }
                    })?;
                    let text = String::from_utf8(decoded).map_err(|_| GenerateError::Invalid {
                        path: format!("Secret/{name}.data.{k}"),
                        reason: "is not UTF-8 text, so it cannot be an environment value".into(),
                    })?;
                    data.insert(k, text);
                }
                data.extend(strings(doc.get("stringData")));
                sources.secrets.insert(name.to_owned(), data);
            }
            _ => {}
        }
    }
    Ok(sources)
}

/// YAML scalars as the strings Kubernetes would use.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn int(v: Option<&Value>, path: &str) -> Result<Option<u32>, GenerateError> {
    v.map(|v| {
        v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| GenerateError::Invalid {
            path: path.to_owned(),
            reason: format!("expected a non-negative integer, found {v}"),
        })
    })
    .transpose()
}

fn pod(
    path: &str,
    name: &str,
    spec: &Value,
    sources: &ConfigSources,
    options: &Options,
) -> Result<Workload, GenerateError> {
    let mut check = FieldCheck::new();
    check.keys(spec, path, POD_SPEC_KEYS);
    for ns in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec.get(ns).and_then(Value::as_bool) == Some(true) {
            return Err(GenerateError::Invalid {
                path: format!("{path}.{ns}"),
                reason: "a confidential sandbox is its own VM and cannot share the host's namespaces".into(),
            });
        }
    }
    let pod_security = spec.get("securityContext").cloned().unwrap_or(Value::Null);
    check.keys(&pod_security, &format!("{path}.securityContext"), POD_SECURITY_KEYS);
    let (volumes, encfs) = volumes(path, spec, &mut check)?;

    let mut containers = Vec::new();
    for key in ["initContainers", "containers"] {
        let Some(list) = spec.get(key) else { continue };
        let list = list.as_array().ok_or_else(|| GenerateError::Invalid {
            path: format!("{path}.{key}"),
            reason: "expected a list".into(),
        })?;
        for (i, c) in list.iter().enumerate() {
            let cpath = format!("{path}.{key}[{i}]");
            containers.push(container(&cpath, c, &pod_security, &volumes, sources, &mut check)?);
        }
    }
    check.finish(options)?;
    if containers.is_empty() {
        return Err(GenerateError::Invalid { path: format!("{path}.containers"), reason: "no containers".into() });
    }
    Ok(Workload { platform: Platform::Kubernetes, name: name.to_owned(), containers, workload_api: None, encfs })
}

/// The pod's volumes by name, and its encrypted filesystems in spec order.
fn volumes(
    path: &str,
    spec: &Value,
    check: &mut FieldCheck,
) -> Result<(HashMap<String, VolumeSource>, Vec<EncfsVolume>), GenerateError> {
    let mut out = HashMap::new();
    let mut encfs = Vec::new();
    let Some(list) = spec.get("volumes").and_then(Value::as_array) else { return Ok((out, encfs)) };
    for (i, v) in list.iter().enumerate() {
        let vpath = format!("{path}.volumes[{i}]");
        let name = required_str(v, "name", &vpath)?;
        let csi = v.get("csi").filter(|c| c.get("driver").and_then(Value::as_str) == Some(ENCFS_CSI_DRIVER));
        let source = if let Some(csi) = csi {
            encfs.push(encfs_volume(&vpath, name, csi, check)?);
            VolumeSource::Encfs(name.to_owned())
        } else if let Some(host) = v.get("hostPath") {
            let p = host.get("path").and_then(Value::as_str).ok_or_else(|| GenerateError::Invalid {
                path: format!("{vpath}.hostPath.path"),
                reason: "missing".into(),
            })?;
            VolumeSource::HostPath(p.to_owned())
        } else if v.get("emptyDir").and_then(|e| e.get("medium")).and_then(Value::as_str) == Some("Memory") {
            VolumeSource::Tmpfs
        } else if ["emptyDir", "configMap", "secret", "projected", "downwardAPI", "persistentVolumeClaim"]
            .iter()
            .any(|k| v.get(k).is_some())
        {
            VolumeSource::Sandbox(name.to_owned())
        } else {
            check.unsupported(format!("{vpath} (volume type)"));
            continue;
        };
        out.insert(name.to_owned(), source);
    }
    Ok((out, encfs))
}

/// An `encfs.capsa.dev` CSI volume (see the module documentation), its
/// fields checked by the initdata's own rules so that each complaint names
/// the field here. Whether a trust service is given is the workload's to
/// check, when its settings are put together.
fn encfs_volume(vpath: &str, name: &str, csi: &Value, check: &mut FieldCheck) -> Result<EncfsVolume, GenerateError> {
    let cpath = format!("{vpath}.csi");
    check.keys(csi, &cpath, ENCFS_CSI_KEYS);
    let read_only = match csi.get("readOnly") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| GenerateError::Invalid {
            path: format!("{cpath}.readOnly"),
            reason: format!("expected true or false, found {v}"),
        })?,
    };
    let apath = format!("{cpath}.volumeAttributes");
    let attributes = csi.get("volumeAttributes").filter(|a| a.is_object()).ok_or_else(|| GenerateError::Invalid {
        path: apath.clone(),
        reason: "missing (or not a mapping): an encrypted filesystem needs its url and key".into(),
    })?;
    check.keys(attributes, &apath, ENCFS_ATTRIBUTE_KEYS);
    let volume = EncfsVolume {
        name: name.to_owned(),
        url: required_str(attributes, "url", &apath)?.to_owned(),
        key: required_str(attributes, "key", &apath)?.to_owned(),
        read_only,
    };
    let alone = SandboxSettings { encfs: vec![volume.clone()], ..SandboxSettings::default() };
    let (path, reason) = match alone.validate() {
        Ok(()) => return Ok(volume),
        // Alone it has no trust service; that is not this volume's fault.
        Err(DocumentError::Settings { field, .. }) if field == "encfs" => return Ok(volume),
        Err(DocumentError::Settings { field, reason }) => match field.as_str() {
            "encfs[0].name" => (
                format!("{vpath}.name"),
                format!(
                    "{reason}: the name of an encrypted filesystem volume is its directory {ENCFS_MOUNT_ROOT}/<name> in the sandbox; rename the volume (and its volumeMounts)"
                ),
            ),
            "encfs[0].url" => (
                format!("{apath}.url"),
                format!(
                    "{reason} (an encrypted filesystem's url is its image's prefix, http(s)://HOST[:PORT]/PATH, without credentials or a SAS query: initdata is public)"
                ),
            ),
            "encfs[0].key" => (format!("{apath}.key"), reason),
            _ => (vpath.to_owned(), format!("{field}: {reason}")),
        },
        Err(other) => return Err(other.into()),
    };
    Err(GenerateError::Invalid { path, reason })
}

fn container(
    path: &str,
    c: &Value,
    pod_security: &Value,
    volumes: &HashMap<String, VolumeSource>,
    sources: &ConfigSources,
    check: &mut FieldCheck,
) -> Result<ContainerSpec, GenerateError> {
    check.keys(c, path, CONTAINER_KEYS);
    let name = required_str(c, "name", path)?;
    let image = required_str(c, "image", path)?;
    let security = c.get("securityContext").cloned().unwrap_or(Value::Null);
    check.keys(&security, &format!("{path}.securityContext"), CONTAINER_SECURITY_KEYS);
    // Container settings win over the pod's.
    let sec = |key: &str| security.get(key).or_else(|| pod_security.get(key));
    let seccomp = sec("seccompProfile");
    if let Some(kind) = seccomp.and_then(|s| s.get("type")).and_then(Value::as_str) {
        if kind == "Localhost" {
            check.unsupported(format!("{path}.securityContext.seccompProfile (Localhost profiles live on the host)"));
        }
    }
    let capabilities = security.get("capabilities");
    let cap_list = |key: &str| {
        string_list(capabilities.and_then(|c| c.get(key)), &format!("{path}.securityContext.capabilities.{key}"))
    };

    let mut supplemental_groups = Vec::new();
    for key in ["supplementalGroups", "fsGroup"] {
        match pod_security.get(key) {
            Some(Value::Array(gs)) => {
                for (i, g) in gs.iter().enumerate() {
                    supplemental_groups.extend(int(Some(g), &format!("securityContext.{key}[{i}]"))?);
                }
            }
            Some(g) => supplemental_groups.extend(int(Some(g), &format!("securityContext.{key}"))?),
            None => {}
        }
    }
    let mut sysctls = BTreeMap::new();
    if let Some(list) = pod_security.get("sysctls").and_then(Value::as_array) {
        for s in list {
            if let (Some(n), Some(v)) = (s.get("name").and_then(Value::as_str), s.get("value").and_then(scalar)) {
                sysctls.insert(n.to_owned(), v);
            }
        }
    }

    let mut mounts = Vec::new();
    if let Some(list) = c.get("volumeMounts").and_then(Value::as_array) {
        for (i, m) in list.iter().enumerate() {
            let mpath = format!("{path}.volumeMounts[{i}]");
            check.keys(m, &mpath, VOLUME_MOUNT_KEYS);
            if m.get("mountPropagation").and_then(Value::as_str).is_some_and(|p| p != "None") {
                check.unsupported(format!("{mpath}.mountPropagation"));
            }
            let mount = volume_mount(&mpath, m, volumes, "pod spec")?;
            if let VolumeSource::Encfs(volume) = &mount.source {
                if let Some(key) = ["subPath", "subPathExpr"].into_iter().find(|k| m.get(k).is_some()) {
                    return Err(GenerateError::Invalid {
                        path: format!("{mpath}.{key}"),
                        reason: format!(
                            "is not supported on encrypted filesystem volume \"{volume}\": mount the whole volume and use the directory inside it"
                        ),
                    });
                }
            }
            mounts.push(mount);
        }
    }

    let mut exec = Vec::new();
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(cmd) =
            string_list(c.pointer(&format!("/{probe}/exec/command")), &format!("{path}.{probe}.exec.command"))?
        {
            exec.push(cmd);
        }
    }
    for hook in ["postStart", "preStop"] {
        if let Some(cmd) = string_list(
            c.pointer(&format!("/lifecycle/{hook}/exec/command")),
            &format!("{path}.lifecycle.{hook}.exec.command"),
        )? {
            exec.push(cmd);
        }
    }

    let env = env(path, c, sources, check)?;
    // The kubelet expands $(VAR) in command and args from the container's
    // environment, so the runtime sends the expanded strings.
    let expand_all = |key: &str| -> Result<Option<Vec<String>>, GenerateError> {
        let Some(words) = string_list(c.get(key), &format!("{path}.{key}"))? else { return Ok(None) };
        words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if let Some(runtime) = env.iter().find_map(|e| match e {
                    EnvSpec::RuntimeValue { name, .. } if w.contains(&format!("$({name})")) => Some(name),
                    _ => None,
                }) {
                    return Err(GenerateError::Invalid {
                        path: format!("{path}.{key}[{i}]"),
                        reason: format!("refers to $({runtime}), whose value is only known at run time, so the command cannot be pinned"),
                    });
                }
                Ok(expand(w, &env))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    Ok(ContainerSpec {
        name: name.to_owned(),
        image: image.to_owned(),
        command: expand_all("command")?,
        args: expand_all("args")?,
        env,
        working_dir: c.get("workingDir").and_then(Value::as_str).map(str::to_owned),
        run_as_user: int(sec("runAsUser"), &format!("{path}.securityContext.runAsUser"))?,
        run_as_group: int(sec("runAsGroup"), &format!("{path}.securityContext.runAsGroup"))?,
        supplemental_groups,
        privileged: security.get("privileged").and_then(Value::as_bool).unwrap_or(false),
        allow_privilege_escalation: security.get("allowPrivilegeEscalation").and_then(Value::as_bool),
        read_only_rootfs: security.get("readOnlyRootFilesystem").and_then(Value::as_bool).unwrap_or(false),
        cap_add: cap_list("add")?.unwrap_or_default(),
        cap_drop: cap_list("drop")?.unwrap_or_default(),
        mounts,
        sysctls,
        seccomp_profile_sha256: None,
        exec,
        stdin: c.get("stdin").and_then(Value::as_bool).unwrap_or(false),
        tty: c.get("tty").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// Values the downward API fills in at run time, as patterns.
fn field_ref_pattern(field: &str) -> &'static str {
    match field {
        "status.podIP" | "status.hostIP" => "[0-9a-fA-F.:]+",
        "status.podIPs" | "status.hostIPs" => "[0-9a-fA-F.:,]+",
        "metadata.name" | "metadata.namespace" | "spec.nodeName" | "spec.serviceAccountName" => {
            "[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?"
        }
        "metadata.uid" => "[0-9a-f-]{36}",
        _ => ".*",
    }
}

fn env(path: &str, c: &Value, sources: &ConfigSources, check: &mut FieldCheck) -> Result<Vec<EnvSpec>, GenerateError> {
    let mut out: Vec<EnvSpec> = Vec::new();
    let lookup = |kind: &str,
                  name: &str,
                  key: Option<&str>,
                  optional: bool,
                  at: &str|
     -> Result<Option<BTreeMap<String, String>>, GenerateError> {
        let map = if kind == "configMap" { sources.config_maps.get(name) } else { sources.secrets.get(name) };
        match map {
            Some(m) => Ok(Some(match key {
                Some(k) => m.get(k).map(|v| BTreeMap::from([(k.to_owned(), v.clone())])).unwrap_or_default(),
                None => m.clone(),
            })),
            None if optional => Ok(None),
            None => Err(GenerateError::Invalid {
                path: at.to_owned(),
                reason: format!(
                    "refers to {kind} \"{name}\", which is not in the input: the policy must pin its values, so add it to the same file(s)"
                ),
            }),
        }
    };

    if let Some(list) = c.get("envFrom").and_then(Value::as_array) {
        for (i, from) in list.iter().enumerate() {
            let fpath = format!("{path}.envFrom[{i}]");
            let prefix = from.get("prefix").and_then(Value::as_str).unwrap_or_default();
            for (field, kind) in [("configMapRef", "configMap"), ("secretRef", "secret")] {
                let Some(r) = from.get(field) else { continue };
                let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
                let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
                for (k, v) in lookup(kind, name, None, optional, &fpath)?.unwrap_or_default() {
                    let name = format!("{prefix}{k}");
                    let entry =
                        if kind == "configMap" { EnvSpec::Literal { name, value: v } } else { secret_env(&name) };
                    push_env(&mut out, entry);
                }
            }
        }
    }
    let Some(list) = c.get("env").and_then(Value::as_array) else { return Ok(out) };
    for (i, e) in list.iter().enumerate() {
        let epath = format!("{path}.env[{i}]");
        check.keys(e, &epath, ENV_KEYS);
        let name = required_str(e, "name", &epath)?;
        if let Some(from) = e.get("valueFrom") {
            let mut resolved = false;
            for (field, kind) in [("configMapKeyRef", "configMap"), ("secretKeyRef", "secret")] {
                let Some(r) = from.get(field) else { continue };
                resolved = true;
                let src = r.get("name").and_then(Value::as_str).unwrap_or_default();
                let key = r.get("key").and_then(Value::as_str).unwrap_or_default();
                let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
                let values = lookup(kind, src, Some(key), optional, &epath)?;
                match values.and_then(|m| m.into_values().next()) {
                    Some(value) if kind == "configMap" => {
                        push_env(&mut out, EnvSpec::Literal { name: name.to_owned(), value })
                    }
                    Some(_) => push_env(&mut out, secret_env(name)),
                    None if optional => {}
                    None => {
                        return Err(GenerateError::Invalid {
                            path: epath.clone(),
                            reason: format!("{kind} \"{src}\" has no key \"{key}\""),
                        });
                    }
                }
            }
            if let Some(field) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
                resolved = true;
                push_env(
                    &mut out,
                    EnvSpec::RuntimeValue { name: name.to_owned(), value_pattern: field_ref_pattern(field).into() },
                );
            }
            if from.get("resourceFieldRef").is_some() {
                resolved = true;
                push_env(&mut out, EnvSpec::RuntimeValue { name: name.to_owned(), value_pattern: "[0-9]+".into() });
            }
            if !resolved {
                check.unsupported(format!("{epath}.valueFrom"));
            }
        } else {
            let raw = e.get("value").and_then(scalar).unwrap_or_default();
            let value = expand(&raw, &out);
            push_env(&mut out, EnvSpec::Literal { name: name.to_owned(), value });
        }
    }
    Ok(out)
}

/// A variable set from a Secret. Its value is not pinned: the policy is
/// public (it travels in an annotation), so pinning would publish the
/// secret. Confidential values belong in key release, not in Secrets.
fn secret_env(name: &str) -> EnvSpec {
    EnvSpec::RuntimeValue { name: name.to_owned(), value_pattern: ".*".into() }
}

/// A later definition of a name replaces an earlier one, as in the runtime.
fn push_env(out: &mut Vec<EnvSpec>, entry: EnvSpec) {
    let name = match &entry {
        EnvSpec::Literal { name, .. } | EnvSpec::RuntimeValue { name, .. } => name.clone(),
    };
    out.retain(
        |e| !matches!(e, EnvSpec::Literal { name: n, .. } | EnvSpec::RuntimeValue { name: n, .. } if *n == name),
    );
    out.push(entry);
}

/// Kubernetes' `$(VAR)` expansion from earlier literal variables; `$$` is
/// an escaped `$`, and references to unknown variables stay as written.
fn expand(value: &str, env: &[EnvSpec]) -> String {
    let Ok(reference) = regex::Regex::new(r"\$\$|\$\(([^)]*)\)") else { return value.to_owned() };
    reference
        .replace_all(value, |caps: &regex::Captures<'_>| match caps.get(1) {
            None => "$".to_owned(),
            Some(name) => env
                .iter()
                .find_map(|e| match e {
                    EnvSpec::Literal { name: n, value } if n == name.as_str() => Some(value.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| caps.get(0).map_or_else(String::new, |m| m.as_str().to_owned())),
        })
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_api_annotation_restricts_the_endpoints() {
        let template =
            |value: Value| serde_json::json!({"metadata": {"annotations": {WORKLOAD_API_ANNOTATION: value}}});
        let read = |value: Value| workload_api("Pod/p", &template(value));
        assert_eq!(workload_api("Pod/p", &serde_json::json!({"metadata": {}})).unwrap(), None);
        assert_eq!(read("none".into()).unwrap(), Some(vec![]));
        assert_eq!(
            read(" key/release,status , key/release".into()).unwrap(),
            Some(vec!["status".to_owned(), "key/release".to_owned()])
        );
        for (value, expected) in [
            (Value::from("status,key-release"), "names \"key-release\""),
            (Value::from("status,,attest/maa"), "empty endpoint name"),
            (Value::from(""), "empty endpoint name"),
            (Value::from(true), "is not a string"),
        ] {
            let error = read(value.clone()).unwrap_err().to_string();
            assert!(error.starts_with("Pod/p.metadata.annotations.\"capsa.dev/workload-api\""), "{error}");
            assert!(error.contains(expected), "{value}: {error}");
            assert!(error.contains("status, attest/raw, attest/maa, key/release"), "{error}");
        }
    }

    struct OneImage;

    impl ImageResolver for OneImage {
        fn resolve(&mut self, _: &str) -> Result<super::super::ImageFacts, String> {
            Ok(super::super::ImageFacts {
                manifest_digest: "sha256:aa".into(),
                diff_ids: vec!["sha256:01".into()],
                cmd: vec!["/bin/app".into()],
                ..Default::default()
            })
        }
    }

    /// The annotation reaches the policy data, and the sandbox settings the
    /// initdata that HOST_DATA measures and the pod template carries.
    #[test]
    fn workload_api_and_sandbox_settings_reach_the_generated_pods() {
        use crate::document::{SandboxSettings, TrustEndpoint};
        let yaml = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  template:
    metadata:
      annotations: {capsa.dev/workload-api: \"key/release, status\"}
    spec:
      containers: [{name: app, image: app:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers: [{name: app, image: app:1}]
";
        let settings = Settings::shipped_and(&[]).unwrap();
        let sandbox_settings = SandboxSettings {
            workload_api_port: 9000,
            trust: vec![TrustEndpoint { url: "https://trust.example:8443".into(), ca: None }],
            ..SandboxSettings::default()
        };
        let options = Options { sandbox_settings: sandbox_settings.clone(), ..Options::default() };
        let generated = generate("in.yaml", yaml, &mut OneImage, &settings, &options).unwrap();
        let [api, web] = generated.workloads.as_slice() else { panic!("two workloads expected") };
        assert_eq!(api.data.sandbox.workload_api, ["status", "key/release"]);
        assert_eq!(web.data.sandbox.workload_api, WORKLOAD_API_ENDPOINTS);
        for w in [api, web] {
            assert_eq!(w.initdata.settings().unwrap(), sandbox_settings);
            assert_eq!(w.host_data, w.initdata.digest());
            assert!(generated.annotated.contains(&base64(w.initdata.toml().as_bytes())), "{}", w.name);
        }
        let plain = generate("in.yaml", yaml, &mut OneImage, &settings, &Options::default()).unwrap();
        assert_eq!(plain.workloads[1].initdata, plain.workloads[1].document.initdata().unwrap());
        assert_ne!(plain.workloads[1].host_data, web.host_data);

        let bad = yaml.replace("key/release, status", "key/release, admin");
        let error = generate("in.yaml", &bad, &mut OneImage, &settings, &options).unwrap_err().to_string();
        assert!(error.contains("Deployment/api.spec.template.metadata.annotations"), "{error}");
        assert!(error.contains("\"admin\""), "{error}");
    }

    const ENCFS_PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: store}
spec:
  volumes:
  - name: data
    csi:
      driver: encfs.capsa.dev
      volumeAttributes:
        url: http://127.0.0.1:10000/devstoreaccount1/images/data
        key: data-key
  - name: models
    csi:
      driver: encfs.capsa.dev
      readOnly: true
      volumeAttributes: {url: \"https://acct.blob.core.windows.net/images/models\", key: models-key}
  containers:
  - name: writer
    image: app:1
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: models, mountPath: /models}
  - name: reader
    image: app:1
    volumeMounts:
    - {name: data, mountPath: /data, readOnly: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: other}
spec:
  template:
    spec:
      volumes:
      - name: data
        csi:
          driver: encfs.capsa.dev
          volumeAttributes: {url: \"http://127.0.0.1:10000/devstoreaccount1/images/other\", key: other-key}
      containers:
      - name: app
        image: app:1
        volumeMounts: [{name: data, mountPath: /srv}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain}
spec:
  containers: [{name: app, image: app:1}]
";

    fn trust_options() -> Options {
        use crate::document::TrustEndpoint;
        let sandbox_settings = SandboxSettings {
            trust: vec![TrustEndpoint { url: "http://127.0.0.1:8443".into(), ca: None }],
            ..SandboxSettings::default()
        };
        Options { sandbox_settings, ..Options::default() }
    }

    fn encfs(name: &str, url: &str, key: &str, read_only: bool) -> EncfsVolume {
        EncfsVolume { name: name.into(), url: url.into(), key: key.into(), read_only }
    }

    fn mount<'p>(policy: &'p crate::model::PolicyData, container: &str, destination: &str) -> &'p MountPolicy {
        let container = policy.containers.iter().find(|c| c.name == container).unwrap();
        container.mounts.iter().find(|m| m.destination == destination).unwrap()
    }

    use crate::model::{MountPolicy, SourceMatch};

    /// Each pod's encrypted filesystems go into its own initdata beside the
    /// options' settings (the same volume name in two pods is two volumes),
    /// and each container's mount of one is a bind mount of exactly the
    /// path the agent mounts it at, read-only when the mount or the volume is.
    #[test]
    fn encfs_volumes_reach_the_initdata_and_the_mounts() {
        let settings = Settings::shipped_and(&[]).unwrap();
        let options = trust_options();
        let generated = generate("in.yaml", ENCFS_PODS, &mut OneImage, &settings, &options).unwrap();
        let [store, other, plain] = generated.workloads.as_slice() else { panic!("three workloads expected") };

        let data = encfs("data", "http://127.0.0.1:10000/devstoreaccount1/images/data", "data-key", false);
        let models = encfs("models", "https://acct.blob.core.windows.net/images/models", "models-key", true);
        let expected = SandboxSettings { encfs: vec![data, models], ..options.sandbox_settings.clone() };
        assert_eq!(store.settings, expected);
        assert_eq!(store.initdata.settings().unwrap(), expected);
        assert_eq!(store.host_data, store.initdata.digest());
        let other_data = encfs("data", "http://127.0.0.1:10000/devstoreaccount1/images/other", "other-key", false);
        let expected = SandboxSettings { encfs: vec![other_data], ..options.sandbox_settings.clone() };
        assert_eq!(other.initdata.settings().unwrap(), expected);
        // A pod without encrypted filesystems gets the options' settings as they are.
        assert_eq!(plain.initdata, plain.document.initdata_with(&options.sandbox_settings).unwrap());
        assert_eq!(plain.settings, options.sandbox_settings);

        let bind = |source: &str, option: &str| MountPolicy {
            destination: String::new(),
            fs_type: "bind".into(),
            source: SourceMatch::Exact(source.into()),
            options: vec![option.into()],
        };
        let at = |destination: &str, m: MountPolicy| MountPolicy { destination: destination.into(), ..m };
        assert_eq!(*mount(&store.data, "writer", "/data"), at("/data", bind("/run/capsa/encfs/data", "rw")));
        assert_eq!(*mount(&store.data, "reader", "/data"), at("/data", bind("/run/capsa/encfs/data", "ro")));
        // The volume is read-only: so is every mount of it, whatever the mount says.
        assert_eq!(*mount(&store.data, "writer", "/models"), at("/models", bind("/run/capsa/encfs/models", "ro")));
        assert_eq!(*mount(&other.data, "app", "/srv"), at("/srv", bind("/run/capsa/encfs/data", "rw")));
        for w in [store, other] {
            assert!(generated.annotated.contains(&base64(w.initdata.toml().as_bytes())), "{}", w.name);
        }
    }

    /// The engine allows the honest requests for the generated policy, and
    /// denies another volume at the same destination, or a read-only one
    /// mounted writable, saying which mount.
    #[test]
    fn the_engine_holds_containers_to_their_encfs_mounts() {
        use crate::engine::Engine;
        use crate::request::Request;
        let settings = Settings::shipped_and(&[]).unwrap();
        let generated = generate("in.yaml", ENCFS_PODS, &mut OneImage, &settings, &trust_options()).unwrap();
        let store = &generated.workloads[0];
        let mut engine = Engine::from_document(store.document.rego()).unwrap();
        let decide = |engine: &mut Engine, request: &crate::request::CreateContainer| {
            engine.decide_request(&Request::CreateContainer(Box::new(request.clone())))
        };
        let honest: Vec<_> = store
            .data
            .containers
            .iter()
            .map(|c| crate::request::CreateContainer::conforming("sandbox-1", c).unwrap())
            .collect();
        for request in &honest {
            let decision = decide(&mut engine, request);
            assert!(decision.allowed, "{}: {decision}", request.container);
        }
        let [writer, reader] = honest.as_slice() else { panic!("two containers expected") };
        let index = |request: &crate::request::CreateContainer, destination: &str| {
            request.mounts.iter().position(|m| m.destination == destination).unwrap()
        };

        let mut swapped = writer.clone();
        let i = index(&swapped, "/data");
        swapped.mounts[i].source = "/run/capsa/encfs/other".into();
        let decision = decide(&mut engine, &swapped);
        assert!(!decision.allowed);
        let text = decision.to_string();
        assert!(
            text.contains(&format!("mounts[{i}]: source /run/capsa/encfs/other is not /run/capsa/encfs/data")),
            "{text}"
        );

        for (request, destination) in [(reader, "/data"), (writer, "/models")] {
            let mut writable = request.clone();
            let i = index(&writable, destination);
            writable.mounts[i].options = vec!["rw".into()];
            let decision = decide(&mut engine, &writable);
            assert!(!decision.allowed);
            let text = decision.to_string();
            let expected = format!("mounts[{i}]: {destination} is writable (rw) but the policy mounts it read-only");
            assert!(text.contains(&expected), "{destination}: {text}");
            writable.mounts[i].options = Vec::new();
            let text = decide(&mut engine, &writable).to_string();
            assert!(text.contains(&format!("lack [\"ro\"], which the policy requires at {destination}")), "{text}");
        }
    }

    /// Every mistake in an encrypted filesystem volume names its field.
    #[test]
    fn encfs_volume_errors_name_the_field() {
        let settings = Settings::shipped_and(&[]).unwrap();
        let pod = |volume: &str, mount: &str| {
            format!(
                "kind: Pod\nmetadata: {{name: p}}\nspec:\n  volumes: [{volume}]\n  containers: [{{name: app, image: app:1, volumeMounts: [{mount}]}}]\n"
            )
        };
        let url = "http://127.0.0.1:10000/a/c/d";
        let volume = |name: &str, attributes: &str| {
            format!("{{name: {name}, csi: {{driver: encfs.capsa.dev, volumeAttributes: {{{attributes}}}}}}}")
        };
        let good = volume("data", &format!("url: \"{url}\", key: data-key"));
        let mount = "{name: data, mountPath: /data}";
        let error = |yaml: &str| generate("in.yaml", yaml, &mut OneImage, &settings, &trust_options()).unwrap_err();
        assert!(generate("in.yaml", &pod(&good, mount), &mut OneImage, &settings, &trust_options()).is_ok());

        let at = "Pod/p.spec.volumes[0]";
        for (volume, path, expected) in [
            (volume("data", "key: data-key"), format!("{at}.csi.volumeAttributes.url"), "missing"),
            (volume("data", &format!("url: \"{url}\"")), format!("{at}.csi.volumeAttributes.key"), "missing"),
            (volume("data", "url: 7, key: k"), format!("{at}.csi.volumeAttributes.url"), "not a string"),
            (
                volume("data", "url: \"az://c/d\", key: data-key"),
                format!("{at}.csi.volumeAttributes.url"),
                "not an http or https URL",
            ),
            (
                volume("data", "url: \"https://acct.example/c/d?sv=2024&sig=x\", key: data-key"),
                format!("{at}.csi.volumeAttributes.url"),
                "query or fragment",
            ),
            (
                volume("data", &format!("url: \"{url}\", key: \"a/b\"")),
                format!("{at}.csi.volumeAttributes.key"),
                "not a key name",
            ),
            (volume("Data_1", &format!("url: \"{url}\", key: k")), format!("{at}.name"), "/run/capsa/encfs/<name>"),
            (
                "{name: data, csi: {driver: encfs.capsa.dev}}".to_owned(),
                format!("{at}.csi.volumeAttributes"),
                "needs its url and key",
            ),
            (
                format!(
                    "{{name: data, csi: {{driver: encfs.capsa.dev, readOnly: yes please, volumeAttributes: {{url: \"{url}\", key: k}}}}}}"
                ),
                format!("{at}.csi.readOnly"),
                "expected true or false",
            ),
        ] {
            let yaml = pod(&volume, if path.ends_with(".name") { "{name: Data_1, mountPath: /data}" } else { mount });
            match error(&yaml) {
                GenerateError::Invalid { path: p, reason } => {
                    assert_eq!(p, path, "{volume}: {reason}");
                    assert!(reason.contains(expected), "{volume}: {reason}");
                }
                other => panic!("{volume}: expected an error at {path}, got {other}"),
            }
        }

        // Fields the driver does not take, and other CSI drivers, are unsupported.
        let extra = volume("data", &format!("url: \"{url}\", key: k, sas: s"));
        let extra = extra.replace("driver: encfs.capsa.dev", "driver: encfs.capsa.dev, fsType: ext4");
        match error(&pod(&extra, mount)) {
            GenerateError::Unsupported { paths } => {
                assert_eq!(paths, [format!("{at}.csi.fsType"), format!("{at}.csi.volumeAttributes.sas")])
            }
            other => panic!("expected unsupported fields, got {other}"),
        }
        let other_driver = good.replace("encfs.capsa.dev", "secrets-store.csi.k8s.io");
        match error(&pod(&other_driver, "")) {
            GenerateError::Unsupported { paths } => assert_eq!(paths, [format!("{at} (volume type)")]),
            other => panic!("expected an unsupported volume type, got {other}"),
        }

        // A part of the volume cannot be mounted.
        match error(&pod(&good, "{name: data, mountPath: /data, subPath: logs}")) {
            GenerateError::Invalid { path, reason } => {
                assert_eq!(path, "Pod/p.spec.containers[0].volumeMounts[0].subPath");
                assert!(reason.contains("mount the whole volume"), "{reason}");
            }
            other => panic!("expected an invalid subPath, got {other}"),
        }

        // Without a trust service no key can be released: the error says to pass --trust.
        let without = generate("in.yaml", &pod(&good, mount), &mut OneImage, &settings, &Options::default());
        let error = without.unwrap_err();
        assert!(
            matches!(&error, GenerateError::EncfsWithoutTrust { workload, volumes } if workload == "Pod/p" && volumes == &["data"])
        );
        let message = error.to_string();
        assert!(
            message.starts_with("Pod/p mounts the encrypted filesystem(s) data,")
                && message.contains("pass --trust URL"),
            "{message}"
        );
    }

    #[test]
    fn dollar_expansion_follows_kubernetes() {
        let env = vec![EnvSpec::Literal { name: "A".into(), value: "x".into() }];
        assert_eq!(expand("$(A)/bin", &env), "x/bin");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("a$b$", &env), "a$b$");
        assert_eq!(expand("$(A", &env), "$(A");
    }
}
