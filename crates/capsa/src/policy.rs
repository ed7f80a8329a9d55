//! `capsa policy ...` and `capsa verity`: argument types and rendering; the
//! work is in `capsa-policy` and `capsa-oci`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use capsa_oci::image::{ImageSource, ManifestOrigin, Platform, ResolveOptions, resolve_blocking};
use capsa_policy::document::{DEFAULT_WORKLOAD_API_PORT, PolicyDocument, SandboxSettings, TrustEndpoint};
use capsa_policy::engine::Engine;
use capsa_policy::generate::settings::Settings;
use capsa_policy::generate::{ImageFacts, ImageResolver, InputKind, Options};
use clap::{Args, Subcommand, ValueEnum};

use crate::output::{out, outln};
use crate::{Refused, UsageError, output, read};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Generate execution policies from Kubernetes YAML, an ARM template or a compose file.
    // Boxed: its arguments are several times the size of the others'.
    Gen(Box<GenArgs>),
    /// Decide a host request against a policy: exit 0 allowed, 1 denied (reasons printed).
    Check(CheckArgs),
    /// Show what changed between two policies, container by container.
    Diff(DiffArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    /// Kubernetes YAML.
    K8s,
    /// Azure Resource Manager template.
    Arm,
    /// Compose file.
    Compose,
}

#[derive(Args)]
pub struct GenArgs {
    /// The input: Kubernetes YAML, ARM template (JSON) or compose file.
    input: PathBuf,
    /// The input's kind (default: detected from its content).
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Write the input with the policy attached here (default: stdout).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Print the Rego document(s) instead of the annotated input.
    #[arg(long)]
    print: bool,
    /// Write the initdata TOML here (one workload only).
    #[arg(long)]
    initdata: Option<PathBuf>,
    /// Extra platform settings (TOML) added to the ones capsa ships.
    #[arg(long)]
    settings: Vec<PathBuf>,
    /// Ignore fields capsa does not support instead of failing.
    #[arg(long)]
    allow_unsupported: bool,
    /// Resolve images from this local OCI layout instead of a registry.
    #[arg(long, conflicts_with_all = ["oci_archive", "docker_archive"])]
    oci_layout: Option<PathBuf>,
    /// Resolve images from this oci-archive tar.
    #[arg(long, conflicts_with = "docker_archive")]
    oci_archive: Option<PathBuf>,
    /// Resolve images from this docker-archive tar (`docker save`).
    #[arg(long)]
    docker_archive: Option<PathBuf>,
    /// Allow plain HTTP to this registry (loopback registries always may).
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Platform to select from multi-arch images.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Resolve only from the local cache.
    #[arg(long)]
    offline: bool,
    /// A trust-service endpoint the sandbox may reach (the launcher forwards
    /// only these): http:// or https://, a host and optionally a port, e.g.
    /// https://trust.example:8443. Repeatable. Written into every workload's
    /// initdata, so HOST_DATA measures it.
    #[arg(long, value_name = "URL")]
    trust: Vec<String>,
    /// The CA (PEM file) the guest trusts for the TLS of a --trust endpoint,
    /// instead of its built-in roots, written URL=PEMFILE (split at the first
    /// =) with URL exactly as given to --trust. Repeatable, once per URL.
    #[arg(long, value_name = "URL=PEMFILE")]
    trust_ca: Vec<String>,
    /// The port of the workload API (/status, /attest/raw, /attest/maa,
    /// /key/release) on 127.0.0.1 inside the sandbox. Written into every
    /// workload's initdata, so HOST_DATA measures it.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_WORKLOAD_API_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    workload_api_port: u16,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The policy: a Rego document or initdata TOML.
    #[arg(long)]
    policy: PathBuf,
    /// The request (JSON object with `op`).
    #[arg(long)]
    request: PathBuf,
    /// Print the decision as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DiffArgs {
    /// The old policy (Rego document or initdata TOML).
    old: PathBuf,
    /// The new policy.
    new: PathBuf,
}

#[derive(Args)]
pub struct VerityArgs {
    /// The file to hash (an image of a filesystem).
    file: PathBuf,
    /// Salt as hex (default: none).
    #[arg(long)]
    salt: Option<String>,
}

/// Adapts capsa-oci's resolver to what policy generation asks. Pods name
/// the same image in several containers (init containers, sidecars); each
/// reference is resolved once per run, so the registry is asked once and
/// every container is pinned to the same digest.
pub(crate) struct OciResolver {
    source: ImageSource,
    options: ResolveOptions,
    resolved: std::collections::HashMap<String, ImageFacts>,
}

impl OciResolver {
    pub(crate) fn new(source: ImageSource, options: ResolveOptions) -> Self {
        Self { source, options, resolved: Default::default() }
    }
}

impl ImageResolver for OciResolver {
    fn resolve(&mut self, reference: &str) -> Result<ImageFacts, String> {
        if let Some(facts) = self.resolved.get(reference) {
            return Ok(facts.clone());
        }
        let image = resolve_blocking(reference, &self.source, &self.options).map_err(|e| e.to_string())?;
        if let ManifestOrigin::Cache(reason) = &image.report.origin {
            let _ = writeln!(std::io::stderr(), "capsa: {reference}: using the cached resolution ({reason:?})");
        }
        let facts = ImageFacts {
            manifest_digest: image.manifest_digest,
            diff_ids: image.layers.into_iter().map(|l| l.diff_id).collect(),
            entrypoint: image.config.entrypoint,
            cmd: image.config.cmd,
            env: image.config.env,
            working_dir: image.config.working_dir,
            user: image.config.user,
        };
        self.resolved.insert(reference.to_owned(), facts.clone());
        Ok(facts)
    }
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Gen(args) => gen_policy(*args),
        PolicyCommand::Check(args) => check(args),
        PolicyCommand::Diff(args) => diff(args),
    }
}

pub(crate) fn text(path: &std::path::Path) -> anyhow::Result<String> {
    String::from_utf8(read(path)?).map_err(|_| UsageError(format!("{} is not UTF-8 text", path.display())).into())
}

fn gen_policy(args: GenArgs) -> anyhow::Result<()> {
    let input = text(&args.input)?;
    let kind = match args.kind {
        Some(Kind::K8s) => InputKind::Kubernetes,
        Some(Kind::Arm) => InputKind::Arm,
        Some(Kind::Compose) => InputKind::Compose,
        None => InputKind::detect(&input),
    };
    let extra: Vec<(String, String)> =
        args.settings.iter().map(|p| Ok((p.display().to_string(), text(p)?))).collect::<anyhow::Result<_>>()?;
    let extra_refs: Vec<(&str, &str)> = extra.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let settings = Settings::shipped_and(&extra_refs).map_err(|e| UsageError(e.to_string()))?;
    let source = match (args.oci_layout, args.oci_archive, args.docker_archive) {
        (Some(dir), _, _) => ImageSource::OciLayout(dir),
        (_, Some(tar), _) => ImageSource::OciArchive(tar),
        (_, _, Some(tar)) => ImageSource::DockerArchive(tar),
        _ => ImageSource::Registry,
    };
    let platform: Platform =
        args.platform.parse().map_err(|e: capsa_oci::image::ImageError| UsageError(e.to_string()))?;
    let options = ResolveOptions {
        platform,
        insecure_registries: args.insecure_registry,
        progress: true,
        offline: args.offline,
        ..ResolveOptions::default()
    };
    let sandbox_settings = sandbox_settings(&args.trust, &args.trust_ca, args.workload_api_port)?;
    let mut resolver = OciResolver { source, options, resolved: Default::default() };
    let origin = args.input.display().to_string();
    let generated = capsa_policy::generate::generate(
        kind,
        &origin,
        &input,
        &mut resolver,
        &settings,
        &Options { allow_unsupported: args.allow_unsupported, sandbox_settings },
    )
    .map_err(|e| UsageError(e.to_string()))?;

    if let Some(path) = &args.initdata {
        let [only] = generated.workloads.as_slice() else {
            return Err(UsageError(format!(
                "--initdata writes one workload's initdata, but {} has {}",
                origin,
                generated.workloads.len()
            ))
            .into());
        };
        output::write_atomic(path, only.initdata.toml().as_bytes())?;
    }
    if args.print {
        for w in &generated.workloads {
            out!("{}", w.document.rego())?;
        }
    } else if let Some(path) = &args.out {
        output::write_atomic(path, generated.annotated.as_bytes())?;
    } else {
        out!("{}", generated.annotated)?;
    }
    let mut stderr = std::io::stderr();
    for w in &generated.workloads {
        writeln!(stderr, "{}: HOST_DATA {}", w.name, hex::encode(w.host_data))?;
        // Measured with HOST_DATA: where each image is and which key opens it.
        for v in &w.settings.encfs {
            let access = if v.read_only { "read-only" } else { "read-write" };
            writeln!(
                stderr,
                "{}: encrypted filesystem {} at {} ({access}): {}, key {}",
                w.name,
                v.name,
                v.mount_point(),
                v.url,
                v.key
            )?;
        }
    }
    Ok(())
}

/// The sandbox settings from `--trust`, `--trust-ca` and
/// `--workload-api-port`, checked before any image is resolved.
fn sandbox_settings(trust: &[String], trust_ca: &[String], port: u16) -> anyhow::Result<SandboxSettings> {
    let mut endpoints: Vec<TrustEndpoint> =
        trust.iter().map(|url| TrustEndpoint { url: url.clone(), ca: None }).collect();
    for arg in trust_ca {
        let (url, file) = arg.split_once('=').ok_or_else(|| {
            UsageError(format!(
                "--trust-ca {arg:?} is not URL=PEMFILE; write e.g. --trust-ca https://trust.example:8443=ca.pem"
            ))
        })?;
        let endpoint = endpoints.iter_mut().find(|e| e.url == url).ok_or_else(|| {
            UsageError(format!("--trust-ca names {url:?}, which no --trust gives; add --trust {url} or fix the URL"))
        })?;
        if endpoint.ca.is_some() {
            return Err(UsageError(format!(
                "--trust-ca gives a CA for {url:?} twice; give one PEM file (it may hold several certificates)"
            ))
            .into());
        }
        let pem = text(std::path::Path::new(file))?;
        endpoint.ca = Some(pem);
    }
    let settings = SandboxSettings { workload_api_port: port, trust: endpoints, ..SandboxSettings::default() };
    settings.validate().map_err(|e| UsageError(e.to_string()))?;
    Ok(settings)
}

fn load_document(path: &std::path::Path) -> anyhow::Result<PolicyDocument> {
    PolicyDocument::from_text(&text(path)?).map_err(|e| UsageError(format!("{}: {e}", path.display())).into())
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let document = load_document(&args.policy)?;
    let request = text(&args.request)?;
    serde_json::from_str::<serde_json::Value>(&request)
        .map_err(|e| UsageError(format!("{} is not JSON: {e}", args.request.display())))?;
    let mut engine =
        Engine::from_document(document.rego()).map_err(|e| UsageError(format!("{}: {e}", args.policy.display())))?;
    let decision = engine.decide_json(&request);
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&decision)?)?;
    } else {
        out!("{decision}")?;
    }
    if decision.allowed { Ok(()) } else { Err(Refused("request denied by the policy".into()).into()) }
}

fn diff(args: DiffArgs) -> anyhow::Result<()> {
    let old = load_document(&args.old)?.data().map_err(|e| UsageError(format!("{}: {e}", args.old.display())))?;
    let new = load_document(&args.new)?.data().map_err(|e| UsageError(format!("{}: {e}", args.new.display())))?;
    let changes = capsa_policy::diff::diff(&old, &new);
    if changes.is_empty() {
        outln!("no changes")?;
    }
    for change in changes {
        outln!("{}", change.to_string().trim_end())?;
    }
    Ok(())
}

pub fn verity(args: VerityArgs) -> anyhow::Result<()> {
    let salt = match &args.salt {
        Some(s) => hex::decode(s.trim()).map_err(|e| UsageError(format!("--salt is not hex: {e}")))?,
        None => Vec::new(),
    };
    let params = capsa_oci::verity::VerityParams { salt };
    let (root, tail) = capsa_oci::verity::root_hash_file_like_veritysetup(&args.file, &params)
        .with_context(|| format!("cannot compute the dm-verity root hash of {}", args.file.display()))?;
    if tail != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "capsa: warning: the last {tail} bytes of {} are not a whole 4096-byte block and are outside the tree (as with veritysetup); pad the file (truncate -s %4096) to cover them",
            args.file.display()
        );
    }
    outln!("{}", hex::encode(root))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use capsa_policy::engine::Engine;
    use capsa_policy::generate::settings::Settings;
    use capsa_policy::generate::{ImageFacts, ImageResolver, InputKind, Options, generate};
    use capsa_policy::request::Request;

    use super::sandbox_settings;

    struct OneImage;

    impl ImageResolver for OneImage {
        fn resolve(&mut self, _: &str) -> Result<ImageFacts, String> {
            Ok(ImageFacts {
                manifest_digest: "sha256:aa".into(),
                diff_ids: vec!["sha256:01".into()],
                cmd: vec!["/bin/app".into()],
                ..ImageFacts::default()
            })
        }
    }

    /// What `capsa run` asks for a pod with an encrypted filesystem is what
    /// its generated policy allows: the runtime passes the volume's exact
    /// source through. Another volume at the same place is refused.
    #[test]
    fn capsa_run_creates_containers_with_encfs_mounts_the_policy_allows() {
        let yaml = "\
kind: Pod
metadata: {name: store}
spec:
  volumes:
  - name: data
    csi:
      driver: encfs.capsa.dev
      readOnly: true
      volumeAttributes: {url: \"http://127.0.0.1:10000/devstoreaccount1/images/data\", key: data-key}
  containers:
  - name: app
    image: app:1
    volumeMounts: [{name: data, mountPath: /data}]
";
        let options = Options {
            sandbox_settings: sandbox_settings(&["http://127.0.0.1:8443".into()], &[], 8080).unwrap(),
            ..Options::default()
        };
        let settings = Settings::shipped_and(&[]).unwrap();
        let generated = generate(InputKind::Kubernetes, "pod.yaml", yaml, &mut OneImage, &settings, &options).unwrap();
        let pod = &generated.workloads[0];
        let mut engine = Engine::from_document(pod.document.rego()).unwrap();
        let request = capsa_runtime::pod::conforming_request("store-1", &pod.data.containers[0]).unwrap();
        let mount = request.mounts.iter().find(|m| m.destination == "/data").unwrap();
        assert_eq!(
            (mount.source.as_str(), mount.options.as_slice()),
            ("/run/capsa/encfs/data", &["ro".to_owned()][..])
        );
        let decision = engine.decide_request(&Request::CreateContainer(Box::new(request.clone())));
        assert!(decision.allowed, "{decision}");

        let mut other = request;
        let i = other.mounts.iter().position(|m| m.destination == "/data").unwrap();
        other.mounts[i].source = "/run/capsa/encfs/other".into();
        let decision = engine.decide_request(&Request::CreateContainer(Box::new(other)));
        assert!(!decision.allowed);
        assert!(
            decision.to_string().contains(&format!("mounts[{i}]: source /run/capsa/encfs/other is not")),
            "{decision}"
        );
    }
}
