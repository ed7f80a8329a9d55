//! `capsa policy gen | check | diff` end to end: images the test builds
//! itself, pushed to a real registry (Debian's docker-registry) on
//! 127.0.0.1, policies generated from each input kind and pinned by golden
//! files, then decided and diffed.
//!
//! Golden files live in tests/golden/policy. Digests and the registry
//! address vary with the machine (the busybox binary comes from Debian's
//! package, the port is random), so they are replaced by names before
//! comparing; everything else is pinned byte for byte. To accept a change:
//! `CAPSA_UPDATE_GOLDEN=1 cargo test -p capsa --test policy_gen`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsa_testkit::{Comp, Image, Registry, TarBuilder, TempDir, build_image_with, layer, skopeo, write_layout};
use serde_json::json;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/policy");
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/policy");

/// The two images the fixtures use, written as one OCI layout.
struct Images {
    busybox: Image,
    tools: Image,
    layout: TempDir,
}

fn images() -> Images {
    let busybox = build_image_with(
        vec![
            layer(capsa_testkit::busybox_rootfs(), Comp::Gzip),
            layer(capsa_testkit::whiteout_layer(), Comp::Gzip),
            layer(
                TarBuilder::new().dir("srv/").file("srv/index.html", 0o644, b"<h1>capsa</h1>\n").finish(),
                Comp::Gzip,
            ),
        ],
        "amd64",
        None,
        json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "", "User": ""}),
    );
    let tools = build_image_with(
        vec![
            layer(capsa_testkit::busybox_rootfs(), Comp::Gzip),
            layer(capsa_testkit::text_layer("tools.txt", "tools\n"), Comp::Zstd),
        ],
        "amd64",
        None,
        json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["sleep 3600"], "Env": ["PATH=/bin", "TOOLS=1"], "WorkingDir": "/", "User": "0:0"}),
    );
    let layout = TempDir::new("policy-layout");
    let mut blobs = busybox.blobs();
    blobs.extend(tools.blobs());
    write_layout(layout.path(), &blobs, &[("busybox:1", &busybox.manifest), ("tools:1", &tools.manifest)]);
    Images { busybox, tools, layout }
}

fn push(images: &Images, registry: &Registry) {
    for (name, tag) in [("busybox", "busybox:1"), ("tools", "tools:1")] {
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", images.layout.path().display()),
            &format!("docker://{}/test/{name}:1", registry.addr),
        ]);
    }
}

struct Capsa {
    cache: TempDir,
}

impl Capsa {
    fn new() -> Self {
        Self { cache: TempDir::new("policy-cache") }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_capsa"))
            .args(args)
            .env("XDG_CACHE_HOME", self.cache.path())
            .env("DOCKER_CONFIG", self.cache.join("docker"))
            .env("NO_COLOR", "1")
            .output()
            .expect("run capsa")
    }
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fixture with the registry address filled in, written to `dir`.
fn fixture(name: &str, registry: &str, dir: &TempDir) -> PathBuf {
    let body = std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap().replace("REGISTRY", registry);
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

/// Replaces what varies between machines by stable names.
fn normalise(doc: &str, images: &Images, registry: &str) -> String {
    let mut out = doc.replace(registry, "REGISTRY");
    for (name, image) in [("busybox", &images.busybox), ("tools", &images.tools)] {
        out = out.replace(&image.manifest.digest, &format!("<{name}-manifest>"));
        for (i, l) in image.layers.iter().enumerate() {
            out = out.replace(&l.diff_id, &format!("<{name}-layer-{i}>"));
        }
    }
    out
}

#[track_caller]
fn golden(name: &str, actual: &str) {
    let path = Path::new(GOLDEN).join(name);
    if std::env::var_os("CAPSA_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(GOLDEN).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (CAPSA_UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(expected == actual, "{} differs from the generated document:\n{actual}", path.display());
}

/// HOST_DATA lines from stderr: `NAME: HOST_DATA HEX`.
fn host_data(stderr: &[u8]) -> Vec<(String, String)> {
    text(stderr)
        .lines()
        .filter_map(|l| l.split_once(": HOST_DATA ").map(|(n, h)| (n.to_owned(), h.to_owned())))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

#[test]
fn policies_from_every_input_kind_match_their_golden_files() {
    if !capsa_testkit::have("docker-registry") || !capsa_testkit::have("skopeo") {
        return;
    }
    let images = images();
    let mut registry = Registry::start();
    push(&images, &registry);
    let capsa = Capsa::new();
    let work = TempDir::new("policy-inputs");

    for (input, golden_name) in
        [("pod.yaml", "pod.rego"), ("group.json", "group.rego"), ("compose.yaml", "compose.rego")]
    {
        let path = fixture(input, &registry.addr, &work);
        let path = path.to_str().unwrap();
        let first = capsa.run(&["policy", "gen", path, "--print"]);
        let doc = ok(&first);
        assert!(!doc.contains("s3cr3t"), "{input}: a Secret's value leaked into the public policy");
        golden(golden_name, &normalise(&doc, &images, &registry.addr));
        // Same inputs, same bytes, same digest.
        let again = capsa.run(&["policy", "gen", path, "--print"]);
        assert_eq!(ok(&again), doc, "{input}: generation is not deterministic");
        assert_eq!(host_data(&first.stderr), host_data(&again.stderr));
        assert!(!host_data(&first.stderr).is_empty(), "{input}: no HOST_DATA printed");
    }

    // The annotated Kubernetes output carries base64 initdata whose SHA-256
    // is the printed HOST_DATA, on every pod template.
    let pod = fixture("pod.yaml", &registry.addr, &work);
    let annotated_path = work.join("annotated.yaml");
    let o = capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--out", annotated_path.to_str().unwrap()]);
    ok(&o);
    let printed = host_data(&o.stderr);
    assert_eq!(
        printed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["Pod/web", "Deployment/api", "CronJob/nightly"]
    );
    let annotated = std::fs::read_to_string(&annotated_path).unwrap();
    let found: Vec<String> = annotated
        .lines()
        .filter_map(|l| l.trim().strip_prefix("io.katacontainers.config.hypervisor.cc_init_data: "))
        .map(|b64| {
            use base64::Engine as _;
            let toml = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap();
            assert!(text(&toml).contains("policy.rego"));
            sha256_hex(&toml)
        })
        .collect();
    assert_eq!(found, printed.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>());

    // --initdata writes the TOML for a single workload; its digest is HOST_DATA.
    let compose = fixture("compose.yaml", &registry.addr, &work);
    let initdata = work.join("initdata.toml");
    let o = capsa.run(&["policy", "gen", compose.to_str().unwrap(), "--initdata", initdata.to_str().unwrap()]);
    ok(&o);
    assert_eq!(host_data(&o.stderr)[0].1, sha256_hex(&std::fs::read(&initdata).unwrap()));

    // The ARM template gets ccePolicy, base64 of the document whose SHA-256 is HOST_DATA.
    let group = fixture("group.json", &registry.addr, &work);
    let o = capsa.run(&["policy", "gen", group.to_str().unwrap()]);
    let template: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let cce = template["resources"][0]["properties"]["confidentialComputeProperties"]["ccePolicy"].as_str().unwrap();
    use base64::Engine as _;
    let rego = base64::engine::general_purpose::STANDARD.decode(cce).unwrap();
    assert_eq!(host_data(&o.stderr)[0].1, sha256_hex(&rego));
    assert!(!text(&rego).contains("do-not-pin-me"), "a secureValue leaked into the policy");

    // With the registry stopped, a second generation runs from the cache
    // and produces the same policy.
    let before = ok(&capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--print"]));
    registry.stop();
    let o = capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--print"]);
    assert_eq!(ok(&o), before);
    assert!(text(&o.stderr).contains("cached resolution"), "{}", text(&o.stderr));
}

#[test]
fn images_from_a_local_layout_give_the_same_layers() {
    let images = images();
    let capsa = Capsa::new();
    let work = TempDir::new("policy-layout-input");
    let pod = work.join("pod.yaml");
    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n    - name: c\n      image: busybox:1\n",
    )
    .unwrap();
    let layout = images.layout.path().to_str().unwrap().to_owned();
    let doc = ok(&capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--oci-layout", &layout, "--print"]));
    for l in &images.busybox.layers {
        assert!(doc.contains(&l.diff_id), "layer {} missing from\n{doc}", l.diff_id);
    }
    assert!(doc.contains(&images.busybox.manifest.digest));
}

#[test]
fn unsupported_fields_are_named_unless_allowed() {
    let images = images();
    let capsa = Capsa::new();
    let work = TempDir::new("policy-unsupported");
    let pod = work.join("pod.yaml");
    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  shareProcessNamespace: true\n  containers:\n    - name: c\n      image: busybox:1\n      volumeDevices: []\n",
    )
    .unwrap();
    let layout = images.layout.path().to_str().unwrap().to_owned();
    let o = capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--oci-layout", &layout]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("Pod/p.spec.shareProcessNamespace"), "{err}");
    assert!(err.contains("Pod/p.spec.containers[0].volumeDevices"), "{err}");
    assert!(err.contains("--allow-unsupported"), "{err}");
    ok(&capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--oci-layout", &layout, "--allow-unsupported"]));

    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers: []\n",
    )
    .unwrap();
    let o = capsa.run(&["policy", "gen", pod.to_str().unwrap(), "--oci-layout", &layout]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("hostNetwork"), "{}", text(&o.stderr));
}

#[test]
fn generated_policies_decide_requests_and_diff() {
    let images = images();
    let capsa = Capsa::new();
    let work = TempDir::new("policy-check");
    let layout = images.layout.path().to_str().unwrap().to_owned();
    let write_pod = |name: &str, env_value: &str| {
        let pod = work.join(name);
        std::fs::write(
            &pod,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n    - name: c\n      image: busybox:1\n      command: [\"/bin/sh\", \"-c\", \"echo hi\"]\n      env:\n        - {{name: MODE, value: \"{env_value}\"}}\n"
            ),
        )
        .unwrap();
        pod
    };
    let policy_a = work.join("a.toml");
    let policy_b = work.join("b.toml");
    for (pod, out) in [(write_pod("a.yaml", "blue"), &policy_a), (write_pod("b.yaml", "green"), &policy_b)] {
        ok(&capsa.run(&[
            "policy",
            "gen",
            pod.to_str().unwrap(),
            "--oci-layout",
            &layout,
            "--initdata",
            out.to_str().unwrap(),
            "--out",
            work.join("ignored.yaml").to_str().unwrap(),
        ]));
    }

    let request = |env: &[&str], args: &[&str]| {
        let r = json!({
            "op": "create_container",
            "container": "c",
            "image": images.busybox.manifest.digest,
            "layers": images.busybox.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            "args": args,
            "env": env,
            "working_dir": "/",
            "user": {"uid": 0, "gid": 0, "groups": []},
            "capabilities": ["CAP_CHOWN", "CAP_KILL"],
            "privileged": false,
            "no_new_privileges": false,
            "mounts": [{"source": "proc", "destination": "/proc", "type": "proc", "options": ["nosuid", "noexec", "nodev"]}],
            "read_only_rootfs": false
        });
        let path = work.join("request.json");
        std::fs::write(&path, r.to_string()).unwrap();
        path
    };
    let check = |policy: &PathBuf, req: &PathBuf| {
        capsa.run(&["policy", "check", "--policy", policy.to_str().unwrap(), "--request", req.to_str().unwrap()])
    };
    let good = request(&["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "MODE=blue"], &["/bin/sh", "-c", "echo hi"]);
    ok(&check(&policy_a, &good));
    // The same request against the other policy: MODE differs.
    let o = check(&policy_b, &good);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    assert!(text(&o.stdout).contains("MODE"), "{}", text(&o.stdout));
    assert!(!text(&o.stdout).contains("blue"), "an env value leaked into the explanation:\n{}", text(&o.stdout));
    // A changed command is denied and the reason names the args.
    let bad = request(&["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "MODE=blue"], &["/bin/sh", "-c", "cat /etc/shadow"]);
    let o = check(&policy_a, &bad);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stdout).contains("args"), "{}", text(&o.stdout));
    // Bad input is exit 2.
    let junk = work.join("junk.json");
    std::fs::write(&junk, "{not json").unwrap();
    assert_eq!(check(&policy_a, &junk).status.code(), Some(2));

    let o = capsa.run(&["policy", "diff", policy_a.to_str().unwrap(), policy_b.to_str().unwrap()]);
    let diff = ok(&o);
    assert!(diff.contains("~ c.env.exact") && diff.contains("- MODE=blue") && diff.contains("+ MODE=green"), "{diff}");
    let same = ok(&capsa.run(&["policy", "diff", policy_a.to_str().unwrap(), policy_a.to_str().unwrap()]));
    assert_eq!(same.trim(), "no changes");
}

#[test]
fn workload_api_and_sandbox_settings_go_into_the_initdata() {
    let images = images();
    let capsa = Capsa::new();
    let work = TempDir::new("policy-settings");
    let layout = images.layout.path().to_str().unwrap().to_owned();
    let write_pod = |name: &str, endpoints: &str| {
        let pod = work.join(name);
        std::fs::write(
            &pod,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {{capsa.dev/workload-api: \"{endpoints}\"}}\nspec:\n  containers:\n    - name: c\n      image: busybox:1\n"
            ),
        )
        .unwrap();
        pod
    };
    let pod = write_pod("pod.yaml", "status, attest/maa");
    let ca = work.join("ca.pem");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::fs::write(&ca, pem).unwrap();
    let initdata_path = work.join("initdata.toml");
    let gen_args = |pod: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["policy", "gen", pod.to_str().unwrap(), "--oci-layout", &layout, "--out"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(work.join("annotated.yaml").to_str().unwrap().to_owned());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let run = |args: Vec<String>| capsa.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let trust_ca = format!("https://trust.example:8443={}", ca.display());
    let o = run(gen_args(
        &pod,
        &[
            "--trust",
            "https://trust.example:8443",
            "--trust",
            "http://127.0.0.1:9000",
            "--trust-ca",
            &trust_ca,
            "--workload-api-port",
            "9443",
            "--initdata",
            initdata_path.to_str().unwrap(),
        ],
    ));
    ok(&o);
    let toml = std::fs::read_to_string(&initdata_path).unwrap();
    assert_eq!(host_data(&o.stderr)[0].1, sha256_hex(toml.as_bytes()), "HOST_DATA must measure the settings");
    let initdata = capsa_policy::document::Initdata::from_toml(toml.clone());
    let settings = initdata.settings().unwrap();
    assert_eq!(settings.workload_api_port, 9443);
    assert_eq!(
        settings.trust.iter().map(|t| (t.url.as_str(), t.ca.as_deref())).collect::<Vec<_>>(),
        [("https://trust.example:8443", Some(pem)), ("http://127.0.0.1:9000", None)]
    );
    let data = initdata.policy().unwrap().data().unwrap();
    assert_eq!(data.sandbox.workload_api, ["status", "attest/maa"]);

    // Without the flags: no settings entry, every endpoint, another digest.
    let default_path = work.join("default.toml");
    let o = run(gen_args(
        &write_pod("all.yaml", "status,attest/raw,attest/maa,key/release"),
        &["--initdata", default_path.to_str().unwrap()],
    ));
    ok(&o);
    let default_toml = std::fs::read_to_string(&default_path).unwrap();
    assert!(!default_toml.contains("capsa.toml"), "{default_toml}");
    assert_ne!(host_data(&o.stderr)[0].1, sha256_hex(toml.as_bytes()));

    // The policy decides workload API requests by the annotation.
    let check = |endpoint: &str| {
        let request = work.join("request.json");
        std::fs::write(&request, json!({"op": "workload_api", "endpoint": endpoint}).to_string()).unwrap();
        capsa.run(&[
            "policy",
            "check",
            "--policy",
            initdata_path.to_str().unwrap(),
            "--request",
            request.to_str().unwrap(),
        ])
    };
    ok(&check("attest/maa"));
    let o = check("key/release");
    assert_eq!(o.status.code(), Some(1));
    let explained = text(&o.stdout);
    assert!(
        explained.contains("workload_api.endpoint") && explained.contains("it allows: status, attest/maa"),
        "{explained}"
    );

    // Mistakes are usage errors (exit 2) that say what to fix.
    for (pod, extra, expected) in [
        (write_pod("typo.yaml", "status,key-release"), vec![], "\"key-release\", which is not a workload API endpoint"),
        (pod.clone(), vec!["--trust", "trust.example:8443"], "not an http or https URL"),
        (pod.clone(), vec!["--trust-ca", trust_ca.as_str()], "which no --trust gives"),
        (pod.clone(), vec!["--trust-ca", "https://trust.example:8443"], "is not URL=PEMFILE"),
        (pod.clone(), vec!["--workload-api-port", "0"], "0"),
    ] {
        let o = run(gen_args(&pod, &extra));
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains(expected), "{extra:?}: {}", text(&o.stderr));
    }
}
