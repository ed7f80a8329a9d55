#![allow(missing_docs, clippy::unwrap_used)]
use std::collections::BTreeMap;
use std::time::Instant;
use capsa_policy::engine::{Engine, RULES};
use capsa_policy::model::{ContainerPolicy, EnvPolicy, MountPolicy, PolicyData, SCHEMA_VERSION, SandboxPolicy, SourceMatch, UserPolicy};
use capsa_policy::request::{CreateContainer, Mount, Request, User};
use serde::Deserialize;
const CONTAINERS: usize = 20;
const TARGET: usize = 10;
const ITERS: usize = 20000;
include!("/tmp/common.rs");
fn run(label: &str, data: &PolicyData, rules: &str, reqs: &[(&str, &serde_json::Value)]) {
    let json = serde_json::to_string_pretty(&data).unwrap();
    let doc = format!("{rules}\npolicy_data := {json}\n");
    let mut e = regorus::Engine::new();
    e.set_policy_length_config(regorus::PolicyLengthConfig{ max_col: std::num::NonZeroU32::new(1<<22).unwrap(), max_file_bytes: std::num::NonZeroUsize::new(1<<23).unwrap(), max_lines: std::num::NonZeroUsize::new(1<<22).unwrap()});
    e.add_policy("p.rego".into(), doc).unwrap();
    let cp = e.compile_with_entrypoint(&"data.capsa.policy.decision".into()).unwrap();
    let prog = regorus::languages::rego::compiler::Compiler::compile_from_policy(&cp, &["data.capsa.policy.decision"]).unwrap();
    let mut vm = regorus::rvm::RegoVM::new();
    vm.load_program(prog);
    for (name, r) in reqs {
        let input = regorus::Value::deserialize(*r).unwrap();
        let mut ts = vec![];
        let mut out = regorus::Value::Null;
        for _ in 0..ITERS { let s = Instant::now(); vm.set_input(input.clone()); out = vm.execute_entry_point_by_name("data.capsa.policy.decision").unwrap(); ts.push(s.elapsed().as_nanos()); }
        ts.sort();
        println!("{label} {name}: p50 {}ns p99 {}ns -> {}", ts[ts.len()/2], ts[ts.len()*99/100], &out.to_string()[..out.to_string().len().min(100)]);
    }
}
fn main() {
    let data = policy();
    let req = serde_json::to_value(Request::CreateContainer(Box::new(request(TARGET)))).unwrap();
    run("const", &data, "package capsa.policy\nimport rego.v1\ndecision := {\"allowed\": true, \"reasons\": []}\n", &[("allowed", &req)]);
    let mut nopat = data.clone();
    for c in &mut nopat.containers { c.env.patterns.clear(); c.mounts.retain(|m| matches!(m.source, SourceMatch::Exact(_))); c.env.required = vec!["PATH".into()]; }
    let mut r2 = request(TARGET); r2.env.retain(|e| !e.starts_with("POD_") && !e.starts_with("HOST") && !e.starts_with("KUBE")); r2.mounts.retain(|m| !m.source.starts_with("/run"));
    let req2 = serde_json::to_value(Request::CreateContainer(Box::new(r2))).unwrap();
    run("noregex", &nopat, RULES, &[("allowed", &req2)]);
    if std::env::args().count() < 2 { return; }
    let json = serde_json::to_string_pretty(&data).unwrap();
    let doc = format!("{RULES}\npolicy_data := {json}\n");
    let req = serde_json::to_value(Request::CreateContainer(Box::new(request(TARGET)))).unwrap();
    let dreq = serde_json::to_value(Request::CreateContainer(Box::new(denied_request(TARGET)))).unwrap();
    let mut e = regorus::Engine::new();
    e.set_policy_length_config(regorus::PolicyLengthConfig{ max_col: std::num::NonZeroU32::new(1<<22).unwrap(), max_file_bytes: std::num::NonZeroUsize::new(1<<23).unwrap(), max_lines: std::num::NonZeroUsize::new(1<<22).unwrap()});
    e.add_policy("p.rego".into(), doc).unwrap();
    let t = Instant::now();
    let cp = e.compile_with_entrypoint(&"data.capsa.policy.decision".into()).unwrap();
    let prog = regorus::languages::rego::compiler::Compiler::compile_from_policy(&cp, &["data.capsa.policy.decision"]).unwrap();
    println!("compile {:?}", t.elapsed());
    let mut vm = regorus::rvm::RegoVM::new();
    vm.load_program(prog);
    for (name, r) in [("allowed", &req), ("denied", &dreq)] {
        let input = regorus::Value::deserialize(r).unwrap();
        let mut ts = vec![];
        let mut out = regorus::Value::Null;
        for _ in 0..ITERS { let s = Instant::now(); vm.set_input(input.clone()); out = vm.execute_entry_point_by_name("data.capsa.policy.decision").unwrap(); ts.push(s.elapsed().as_nanos()); }
        ts.sort();
        println!("{name}: p50 {}ns p99 {}ns -> {}", ts[ts.len()/2], ts[ts.len()*99/100], &out.to_string()[..out.to_string().len().min(300)]);
    }
    let mut full = Engine::from_data(&data).unwrap();
    println!("interp: {}", full.decide(&dreq));
}
