//! Policy decisions as data: every `tests/cases/<case>/case.json` is one
//! request against one base policy, with the decision expected. A new case
//! needs no new code.
//!
//! A case file:
//!
//! ```json
//! {
//!   "description": "what the case shows",
//!   "policy": "policy-basic.json",            // PolicyData, in tests/cases/
//!   "request": { "op": "shutdown" },          // the request, verbatim; or:
//!   "base": "requests/create-app.json",       //   a request in tests/cases/
//!   "patch": { "privileged": true },          //   changed by a JSON merge patch (RFC 7396)
//!   "expected": {
//!     "allowed": false,
//!     "rules": ["create_container.privileged"], // the set of rules that deny
//!     "reasons": [                              // optional, finer checks:
//!       { "rule": "...", "field": "...", "message_contains": "..." }
//!     ]
//!   }
//! }
//! ```
//!
//! A string written `{"$repeat": "a", "times": N}` is expanded to N copies,
//! so that oversized requests need not be stored.
//!
//! `CAPSA_PRINT_DECISIONS=1 cargo test -p capsa-policy --test decisions --
//! --nocapture every_case` prints every decision.
//!
//! Every case is decided twice, by the compiled program and by regorus'
//! interpreter, and the two decisions must be identical. No decision may
//! contain `SECRET-MARKER`, which the policies and requests put in
//! environment values.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use capsa_policy::engine::{Decision, Engine};
use capsa_policy::model::PolicyData;
use serde::Deserialize;
use serde_json::Value;

/// Environment values in the case data carry this; no decision may.
const MARKER: &str = "SECRET-MARKER";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    policy: String,
    #[serde(default)]
    request: Option<Value>,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    patch: Option<Value>,
    expected: Expected,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    allowed: bool,
    rules: BTreeSet<String>,
    #[serde(default)]
    reasons: Vec<ExpectedReason>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedReason {
    rule: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    message_contains: Option<String>,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// JSON merge patch (RFC 7396): objects merge, `null` deletes, anything
/// else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(target) = target else { unreachable!() };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Expands `{"$repeat": s, "times": n}` anywhere in `value`.
fn expand(value: &mut Value) {
    match value {
        Value::Object(map) if map.contains_key("$repeat") => {
            let s = map["$repeat"].as_str().expect("$repeat takes a string").to_owned();
            let n = map["times"].as_u64().expect("$repeat needs times") as usize;
            *value = Value::String(s.repeat(n));
        }
        Value::Object(map) => map.values_mut().for_each(expand),
        Value::Array(items) => items.iter_mut().for_each(expand),
        _ => {}
    }
}

fn request_of(case: &Case) -> Value {
    let mut request = match (&case.request, &case.base) {
        (Some(request), None) => request.clone(),
        (None, Some(base)) => {
            let mut request = read_json(&cases_dir().join(base));
            if let Some(patch) = &case.patch {
                merge_patch(&mut request, patch);
            }
            request
        }
        // `"request": null` is a request too (the JSON null).
        (None, None) => Value::Null,
        (Some(_), Some(_)) => panic!("a case has either request or base, not both"),
    };
    expand(&mut request);
    request
}

struct Loaded {
    name: String,
    case: Case,
    request: Value,
}

fn load_cases() -> Vec<Loaded> {
    let mut cases: Vec<Loaded> = fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .map(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(dir.join("case.json")).unwrap();
            let case: Case = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}/case.json: {e}"));
            let request = request_of(&case);
            Loaded { name, case, request }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

fn engines() -> BTreeMap<String, Engine> {
    let mut engines = BTreeMap::new();
    for entry in fs::read_dir(cases_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("policy-") && name.ends_with(".json") {
            let data: PolicyData =
                serde_json::from_value(read_json(&path)).unwrap_or_else(|e| panic!("{name}: not PolicyData: {e}"));
            let engine = Engine::from_data(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
            // decide() must be the compiled form, decide_reference() the
            // interpreter, or the comparisons below compare nothing.
            assert!(engine.is_compiled(), "{name}: the rendered document is not evaluated compiled");
            engines.insert(name.clone(), engine);
        }
    }
    engines
}

/// What is wrong with `decision` for `case`, if anything.
fn check(case: &Case, decision: &Decision) -> Vec<String> {
    let mut problems = Vec::new();
    if decision.allowed != case.expected.allowed {
        problems.push(format!("allowed is {}, expected {}", decision.allowed, case.expected.allowed));
    }
    let rules: BTreeSet<String> = decision.reasons.iter().map(|r| r.rule.clone()).collect();
    if rules != case.expected.rules {
        problems.push(format!("rules are {rules:?}, expected {:?}", case.expected.rules));
    }
    for expected in &case.expected.reasons {
        let found = decision.reasons.iter().any(|r| {
            r.rule == expected.rule
                && expected.field.as_ref().is_none_or(|f| &r.field == f)
                && expected.message_contains.as_ref().is_none_or(|m| r.message.contains(m.as_str()))
        });
        if !found {
            problems.push(format!(
                "no {} reason with field {:?} and a message containing {:?}",
                expected.rule, expected.field, expected.message_contains
            ));
        }
    }
    if !decision.allowed && decision.reasons.is_empty() {
        problems.push("denied without a reason".to_owned());
    }
    for reason in &decision.reasons {
        if reason.message.trim().is_empty() {
            problems.push(format!("{} has an empty message", reason.rule));
        }
    }
    let text = serde_json::to_string(decision).unwrap() + &decision.to_string();
    if text.contains(MARKER) {
        problems.push(format!("the decision shows an environment value:\n{decision}"));
    }
    problems
}

#[test]
fn every_case_decides_as_expected() {
    let mut engines = engines();
    let cases = load_cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for loaded in &cases {
        let engine = engines
            .get_mut(&loaded.case.policy)
            .unwrap_or_else(|| panic!("{}: no policy {}", loaded.name, loaded.case.policy));
        let decision = engine.decide(&loaded.request);
        if std::env::var_os("CAPSA_PRINT_DECISIONS").is_some() {
            println!("== {}: {}\n{decision}", loaded.name, loaded.case.description);
        }
        let mut problems = check(&loaded.case, &decision);
        let reference = engine.decide_reference(&loaded.request);
        if reference != decision {
            problems.push(format!("the interpreter decides otherwise:\n{reference}"));
        }
        let by_rules = engine.decide_by_rules(&loaded.request);
        if by_rules != reference {
            problems.push(format!("the compiled rules decide otherwise:\n{by_rules}"));
        }
        // The native check for create_container: never looser than the
        // rules, and taken by every honest creation (or the benchmark
        // measures a path the agent does not take).
        let fast = engine.fast_path_allows(&loaded.request);
        if fast && !reference.allowed {
            problems.push("the fast path allows a request the rules deny".to_owned());
        }
        let creates = loaded.request.get("op").and_then(Value::as_str) == Some("create_container");
        if creates && reference.allowed && !fast {
            problems.push("the fast path does not take this allowed create_container".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} ({}):\n  - {}\n{decision}",
                loaded.name,
                loaded.case.description,
                problems.join("\n  - ")
            ));
        }
    }
    let passed = cases.len() - failures.len();
    assert!(failures.is_empty(), "{passed} of {} cases pass; failing:\n\n{}", cases.len(), failures.join("\n"));
    println!("{passed} policy cases pass");
}

/// Typed requests decide as their JSON does.
#[test]
fn typed_requests_decide_like_their_json() {
    let mut engines = engines();
    for loaded in load_cases() {
        let Ok(typed) = serde_json::from_value::<capsa_policy::request::Request>(loaded.request.clone()) else {
            continue;
        };
        let engine = engines.get_mut(&loaded.case.policy).unwrap();
        let json = serde_json::to_value(&typed).unwrap();
        assert_eq!(engine.decide_request(&typed), engine.decide(&json), "{}", loaded.name);
    }
}

/// A tiny deterministic generator: the mutations below need no crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Changes one random thing somewhere in `value`.
fn mutate(value: &mut Value, rng: &mut XorShift, depth: usize) {
    let descend = depth < 3 && rng.below(3) > 0;
    match value {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            if key != "op" {
                mutate(map.get_mut(&key).unwrap(), rng, depth + 1);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.below(items.len());
            match rng.below(4) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let j = rng.below(items.len());
                    items.swap(i, j);
                }
                2 => {
                    let copy = items[i].clone();
                    items.insert(rng.below(items.len() + 1), copy);
                }
                _ => mutate(&mut items[i], rng, depth + 1),
            }
        }
        Value::String(s) => {
            *s = match rng.below(6) {
                0 => format!("{s}x"),
                1 => format!("{s}\n"),
                2 => s.chars().skip(1).collect(),
                3 => s.replace('=', "=x"),
                4 => format!("../{s}"),
                _ => String::new(),
            }
        }
        Value::Bool(b) => {
            *value = if rng.below(4) == 0 { Value::String(b.to_string()) } else { Value::Bool(!*b) };
        }
        Value::Number(n) => {
            let n = n.as_u64().unwrap_or(0);
            *value = match rng.below(4) {
                0 => Value::from(n + 1),
                1 => Value::from(n.to_string()),
                // The same number as a float: equal in Rego, not a u32.
                2 => Value::from(n as f64),
                _ => Value::from(0),
            };
        }
        Value::Object(map) => match rng.below(3) {
            0 if !map.is_empty() => {
                let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
                if key != "op" {
                    map.remove(&key);
                }
            }
            1 => {
                map.insert("unexpected".into(), Value::Bool(true));
            }
            _ => {
                let i = rng.below(map.len());
                if let Some((_, v)) = map.iter_mut().nth(i) {
                    *v = Value::Null;
                }
            }
        },
        _ => *value = Value::from(rng.below(100) as u64),
    }
}

/// The compiled program, the engine's native check for create_container
/// and the interpreter agree on many variations of every case's request,
/// allowed or not: the fast path and the compiled form are what decide, the
/// interpreter is the reference semantics.
#[test]
fn compiled_and_interpreted_decisions_agree_on_mutated_requests() {
    let mut engines = engines();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let bases: Vec<Loaded> = load_cases().into_iter().filter(|c| c.request.is_object()).collect();
    // CAPSA_MUTATION_ROUNDS=500 for a longer search.
    let rounds = std::env::var("CAPSA_MUTATION_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 3 } else { 20 });
    let mut compared = 0;
    let mut allowed = 0;
    let mut fast = 0;
    // Allowed creations the native check left to the rules: not wrong, but
    // the agent's hot path should take every honest one.
    let mut slow_creates = Vec::new();
    for _ in 0..rounds {
        for base in &bases {
            let engine = engines.get_mut(&base.case.policy).unwrap();
            let mut request = base.request.clone();
            for _ in 0..=rng.below(2) {
                mutate(&mut request, &mut rng, 0);
            }
            let decided = engine.decide(&request);
            let compiled = engine.decide_by_rules(&request);
            let reference = engine.decide_reference(&request);
            assert_eq!(
                compiled, reference,
                "compiled and interpreted decisions differ for a variation of {}:\n{request:#}",
                base.name
            );
            assert_eq!(decided, reference, "the engine and the interpreter differ for a variation of {}", base.name);
            let fast_allows = engine.fast_path_allows(&request);
            assert!(
                !fast_allows || reference.allowed,
                "the fast path allows a variation of {} that the rules deny:\n{request:#}\n{reference}",
                base.name
            );
            compared += 1;
            allowed += usize::from(compiled.allowed);
            fast += usize::from(fast_allows);
            let creates = request.get("op").and_then(Value::as_str) == Some("create_container");
            if creates && reference.allowed && !fast_allows {
                slow_creates.push(request.clone());
            }
        }
    }
    println!(
        "{compared} mutated requests: {allowed} allowed ({fast} on the fast path), compiled and interpreted agree on all"
    );
    assert!(slow_creates.is_empty(), "allowed creations not on the fast path: {slow_creates:#?}");
}
