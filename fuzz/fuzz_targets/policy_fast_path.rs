//! The policy engine's native check for `create_container` must never allow
//! what the rules deny. The input edits the test suite's honest request for
//! `app` (policy-basic.json): each 3 bytes pick a place in the request and
//! a change there (drop, duplicate, swap, retype, or rewrite a value with
//! the next bytes), so most inputs stay close to an allowed creation, where
//! a check looser than its rule would show. Whenever the native check
//! allows, regorus' interpreter, the reference semantics, must allow too;
//! and the engine must decide as the interpreter does.
#![no_main]

use std::sync::Mutex;

use capsa_policy::engine::Engine;
use capsa_policy::model::PolicyData;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const POLICY: &str = include_str!("../../crates/capsa-policy/tests/cases/policy-basic.json");
const REQUEST: &str = include_str!("../../crates/capsa-policy/tests/cases/requests/create-app.json");

static ENGINE: Mutex<Option<Engine>> = Mutex::new(None);

/// Every place in `value` that can be edited, depth first.
fn places(value: &Value, path: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(path.clone());
    match value {
        Value::Object(map) => {
            for key in map.keys() {
                if key != "op" {
                    path.push(PathStep::Key(key.clone()));
                    places(&map[key], path, out);
                    path.pop();
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(PathStep::Index(i));
                places(item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at<'a>(value: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, step| match step {
        PathStep::Key(k) => v.get_mut(k.as_str()),
        PathStep::Index(i) => v.get_mut(*i),
    })
}

/// Short strings that are near what the policy holds: options, paths,
/// names and values the rules compare against.
const WORDS: [&str; 16] =
    ["ro", "rw", "/", "/.", "/..", "/./", "=", "PATH", "PATH=", "app", "sha256:", "\n", "0", "true", "", "x"];

fn edit(value: &mut Value, op: u8, arg: u8) {
    let word = WORDS[usize::from(arg) % WORDS.len()];
    match (op % 9, &mut *value) {
        (0, Value::Array(items)) if !items.is_empty() => {
            items.remove(usize::from(arg) % items.len());
        }
        (1, Value::Array(items)) if !items.is_empty() => {
            let copy = items[usize::from(arg) % items.len()].clone();
            items.push(copy);
        }
        (2, Value::Array(items)) if items.len() > 1 => {
            let n = items.len();
            let i = usize::from(arg) % n;
            items.swap(i, (i + 1) % n);
        }
        (3, Value::Array(items)) => items.push(Value::String(word.to_owned())),
        (4, Value::Object(map)) => {
            map.insert(word.to_owned(), Value::String(word.to_owned()));
        }
        (5, Value::String(s)) => s.push_str(word),
        (6, Value::String(s)) => *s = word.to_owned(),
        (7, Value::Number(n)) => {
            let n = n.as_u64().unwrap_or(0);
            *value = match arg % 3 {
                0 => Value::from(n as f64),
                1 => Value::from(n.wrapping_add(1)),
                _ => Value::from(n.to_string()),
            };
        }
        (8, Value::Bool(b)) => *value = if arg % 2 == 0 { Value::Bool(!*b) } else { Value::String(b.to_string()) },
        (_, _) => {
            *value = match arg % 4 {
                0 => Value::Null,
                1 => Value::Bool(true),
                2 => Value::from(u64::from(arg)),
                _ => Value::String(word.to_owned()),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    let engine = guard.get_or_insert_with(|| {
        let policy: PolicyData = serde_json::from_str(POLICY).expect("the test suite's policy");
        Engine::from_data(&policy).expect("the test suite's policy loads")
    });
    let mut request: Value = serde_json::from_str(REQUEST).expect("the test suite's request");
    for chunk in data.chunks_exact(3).take(8) {
        let mut all = Vec::new();
        places(&request, &mut Vec::new(), &mut all);
        let path = &all[usize::from(chunk[0]) % all.len()];
        if let Some(place) = at(&mut request, path) {
            edit(place, chunk[1], chunk[2]);
        }
    }
    let fast = engine.fast_path_allows(&request);
    let reference = engine.decide_reference(&request);
    assert!(!fast || reference.allowed, "the fast path allows what the rules deny:\n{request:#}\n{reference}");
    assert_eq!(engine.decide(&request), reference, "{request:#}");
});
