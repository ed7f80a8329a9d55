//! How long deciding a host request takes: `create_container` against a
//! policy of 20 containers (each 10 layers, 15 environment entries of which
//! 5 patterns, 8 mounts), for a container in the middle of the policy.
//!
//! First 10,000 decisions of each kind are timed one by one and p50/p99
//! printed (divan reports medians, not tails); then divan's own statistics.
//! "rules alone" is `Engine::decide_by_rules`, without the engine's native
//! check for create_container: what the compiled Rego costs by itself.
//!
//! `cargo bench -p capsa-policy --bench decide`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::time::Instant;

use capsa_policy::engine::Engine;
use capsa_policy::model::{
    ContainerPolicy, EnvPolicy, MountPolicy, PolicyData, SCHEMA_VERSION, SandboxPolicy, SourceMatch, UserPolicy,
};
use capsa_policy::request::{CreateContainer, Mount, Request, User};

const CONTAINERS: usize = 20;
const TARGET: usize = 10;

fn digest(tag: &str, i: usize, j: usize) -> String {
    format!("sha256:{:064x}", (i * 1000 + j) as u128 * 0x9e37_79b9_7f4a_7c15 + tag.len() as u128)
}

fn container(i: usize) -> ContainerPolicy {
    let mut exact: Vec<String> = (0..10).map(|j| format!("VAR_{j}=value-{i}-{j}")).collect();
    exact.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    ContainerPolicy {
        name: format!("container-{i:02}"),
        image: format!("registry.example.com/team/app-{i}:1.0"),
        image_digest: digest("image", i, 0),
        layers: (0..10).map(|j| digest("layer", i, j)).collect(),
        args: vec!["/usr/bin/app".into(), "--config".into(), "/etc/app/config.yaml".into(), format!("--id={i}")],
        env: EnvPolicy {
            exact,
            patterns: vec![
                "POD_NAME=[a-z0-9-]{1,63}".into(),
                "POD_IP=[0-9]{1,3}(\\.[0-9]{1,3}){3}".into(),
                "HOSTNAME=[a-z0-9.-]+".into(),
                "KUBERNETES_SERVICE_HOST=[0-9.]+".into(),
                "LOG_LEVEL=(debug|info|warn|error)".into(),
            ],
            required: vec!["PATH".into(), "POD_NAME".into()],
        },
        working_dir: "/app".into(),
        user: UserPolicy { uid: 1000, gid: 1000, groups: vec![1000, 2000] },
        capabilities: vec!["CAP_CHOWN".into(), "CAP_NET_BIND_SERVICE".into(), "CAP_KILL".into()],
        privileged: false,
        no_new_privileges: true,
        seccomp_profile_sha256: Some(digest("seccomp", i, 0)),
        mounts: mounts(i),
        read_only_rootfs: true,
        sysctls: BTreeMap::from([("net.core.somaxconn".to_owned(), "1024".to_owned())]),
        exec: vec![vec!["/bin/sh".into(), "-c".into(), "health".into()]],
        signals: vec![15, 9],
        read_stdio: true,
        write_stdin: false,
    }
}

fn mounts(i: usize) -> Vec<MountPolicy> {
    let mut mounts = vec![
        mount("/proc", "proc", SourceMatch::Exact("proc".into()), &["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", SourceMatch::Exact("tmpfs".into()), &["nosuid"]),
        mount("/sys", "sysfs", SourceMatch::Exact("sysfs".into()), &["ro", "nosuid", "noexec", "nodev"]),
        mount("/etc/hosts", "bind", SourceMatch::Pattern("/run/capsa/sandboxes/[0-9a-f]{64}/hosts".into()), &["ro"]),
        mount(
            "/etc/hostname",
            "bind",
            SourceMatch::Pattern("/run/capsa/sandboxes/[0-9a-f]{64}/hostname".into()),
            &["ro"],
        ),
        mount(
            "/etc/resolv.conf",
            "bind",
            SourceMatch::Pattern("/run/capsa/sandboxes/[0-9a-f]{64}/resolv.conf".into()),
            &["ro"],
        ),
        mount("/tmp", "tmpfs", SourceMatch::Exact("tmpfs".into()), &["nosuid", "nodev"]),
    ];
    mounts.push(mount(
        "/data",
        "bind",
        SourceMatch::Pattern(format!("/run/capsa/sandboxes/[0-9a-f]{{64}}/volumes/data-{i}")),
        &["rw"],
    ));
    mounts
}

fn mount(destination: &str, fs_type: &str, source: SourceMatch, options: &[&str]) -> MountPolicy {
    MountPolicy {
        destination: destination.into(),
        fs_type: fs_type.into(),
        source,
        options: options.iter().map(|o| (*o).to_owned()).collect(),
    }
}

fn policy() -> PolicyData {
    PolicyData {
        version: SCHEMA_VERSION,
        containers: (0..CONTAINERS).map(container).collect(),
        sandbox: SandboxPolicy::default(),
    }
}

/// The request the runtime would send for container `i`, allowed.
fn request(i: usize) -> CreateContainer {
    let c = container(i);
    let sandbox = "5f".repeat(32);
    let mut env: Vec<String> = c.env.exact.clone();
    env.extend([
        format!("POD_NAME=app-{i}-7d9f"),
        "POD_IP=10.0.3.17".into(),
        "HOSTNAME=app-7d9f".into(),
        "KUBERNETES_SERVICE_HOST=10.96.0.1".into(),
    ]);
    let mounts = c
        .mounts
        .iter()
        .map(|m| Mount {
            source: match &m.source {
                SourceMatch::Exact(s) => s.clone(),
                SourceMatch::Pattern(_) => format!(
                    "/run/capsa/sandboxes/{sandbox}{}",
                    match m.destination.as_str() {
                        "/data" => format!("/volumes/data-{i}"),
                        d => d.trim_start_matches("/etc").to_owned(),
                    }
                ),
            },
            destination: m.destination.clone(),
            fs_type: m.fs_type.clone(),
            options: m.options.clone(),
        })
        .collect();
    CreateContainer {
        container: c.name,
        image: c.image_digest,
        layers: c.layers,
        args: c.args,
        env,
        working_dir: c.working_dir,
        user: User { uid: 1000, gid: 1000, groups: vec![1000] },
        capabilities: vec!["CAP_NET_BIND_SERVICE".into()],
        privileged: false,
        no_new_privileges: true,
        seccomp_profile_sha256: c.seccomp_profile_sha256,
        mounts,
        read_only_rootfs: true,
        sysctls: c.sysctls,
    }
}

/// Denied on three counts: a swapped layer pair, an extra variable and a
/// writable mount where the policy says read-only.
fn denied_request(i: usize) -> CreateContainer {
    let mut r = request(i);
    r.layers.swap(3, 4);
    r.env.push("EXTRA=1".into());
    if let Some(m) = r.mounts.iter_mut().find(|m| m.destination == "/etc/hosts") {
        m.options = vec!["rw".into()];
    }
    r
}

fn engine() -> Engine {
    Engine::from_data(&policy()).unwrap()
}

/// How a decision is made: what the agent calls, or the rules alone.
#[derive(Clone, Copy)]
enum Path {
    /// `Engine::decide`: the native check for create_container, then the rules.
    Engine,
    /// `Engine::decide_by_rules`: the compiled rules for every request.
    Rules,
}

fn decide(engine: &mut Engine, path: Path, request: &serde_json::Value) -> capsa_policy::engine::Decision {
    match path {
        Path::Engine => engine.decide(request),
        Path::Rules => engine.decide_by_rules(request),
    }
}

fn percentiles(name: &str, engine: &mut Engine, path: Path, request: &serde_json::Value, expect_allowed: bool) {
    const RUNS: usize = 10_000;
    for _ in 0..200 {
        assert_eq!(decide(engine, path, request).allowed, expect_allowed);
    }
    let mut times: Vec<u128> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        let d = decide(engine, path, request);
        times.push(start.elapsed().as_nanos());
        assert_eq!(d.allowed, expect_allowed);
    }
    times.sort_unstable();
    let at = |q: f64| times[((RUNS as f64 * q) as usize).min(RUNS - 1)] as f64 / 1000.0;
    println!(
        "{name:<40} n={RUNS} p50={:.1}µs p90={:.1}µs p99={:.1}µs max={:.1}µs",
        at(0.50),
        at(0.90),
        at(0.99),
        times[RUNS - 1] as f64 / 1000.0
    );
}

/// The same policy and request without regular expressions: mount sources
/// exact, the pattern-allowed variables made exact. The difference to the
/// allowed case is what the regexes cost.
fn regex_free(policy: &mut PolicyData, request: &mut CreateContainer) {
    let sandbox = "5f".repeat(32);
    for (i, c) in policy.containers.iter_mut().enumerate() {
        for m in &mut c.mounts {
            if let SourceMatch::Pattern(_) = m.source {
                let rest = match m.destination.as_str() {
                    "/data" => format!("/volumes/data-{i}"),
                    d => d.trim_start_matches("/etc").to_owned(),
                };
                m.source = SourceMatch::Exact(format!("/run/capsa/sandboxes/{sandbox}{rest}"));
            }
        }
        c.env.patterns.clear();
        let extra: Vec<String> = request.env.iter().filter(|e| !c.env.exact.contains(e)).cloned().collect();
        c.env.exact.extend(extra);
    }
}

fn main() {
    let mut engine = engine();
    let allowed = serde_json::to_value(Request::CreateContainer(Box::new(request(TARGET)))).unwrap();
    let denied = serde_json::to_value(Request::CreateContainer(Box::new(denied_request(TARGET)))).unwrap();
    let d = engine.decide(&denied);
    assert_eq!(d.reasons.len(), 3, "{d}");
    println!("policy: {CONTAINERS} containers; request for container {TARGET}");
    assert!(engine.fast_path_allows(&allowed) && !engine.fast_path_allows(&denied));
    percentiles("create_container allowed", &mut engine, Path::Engine, &allowed, true);
    percentiles("create_container allowed, rules alone", &mut engine, Path::Rules, &allowed, true);
    percentiles("create_container denied (3)", &mut engine, Path::Engine, &denied, false);
    let mut policy = policy();
    let mut plain = request(TARGET);
    regex_free(&mut policy, &mut plain);
    let mut plain_engine = Engine::from_data(&policy).unwrap();
    let plain = serde_json::to_value(Request::CreateContainer(Box::new(plain))).unwrap();
    percentiles("create_container, no regex", &mut plain_engine, Path::Engine, &plain, true);
    percentiles("create_container, no regex, rules alone", &mut plain_engine, Path::Rules, &plain, true);
    divan::main();
}

#[divan::bench]
fn create_container_allowed(bencher: divan::Bencher) {
    let mut engine = engine();
    let request = serde_json::to_value(Request::CreateContainer(Box::new(request(TARGET)))).unwrap();
    bencher.bench_local(|| engine.decide(divan::black_box(&request)));
}

#[divan::bench]
fn create_container_allowed_rules_alone(bencher: divan::Bencher) {
    let mut engine = engine();
    let request = serde_json::to_value(Request::CreateContainer(Box::new(request(TARGET)))).unwrap();
    bencher.bench_local(|| engine.decide_by_rules(divan::black_box(&request)));
}

#[divan::bench]
fn create_container_denied(bencher: divan::Bencher) {
    let mut engine = engine();
    let request = serde_json::to_value(Request::CreateContainer(Box::new(denied_request(TARGET)))).unwrap();
    bencher.bench_local(|| engine.decide(divan::black_box(&request)));
}

#[divan::bench]
fn create_container_typed_request(bencher: divan::Bencher) {
    let mut engine = engine();
    let request = Request::CreateContainer(Box::new(request(TARGET)));
    bencher.bench_local(|| engine.decide_request(divan::black_box(&request)));
}

#[divan::bench]
fn load_document(bencher: divan::Bencher) {
    let data = policy();
    bencher.bench_local(|| Engine::from_data(divan::black_box(&data)).unwrap());
}
