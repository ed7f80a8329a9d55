//! The engine that decides every host request against a policy document.
//!
//! A policy document is one Rego file: the fixed [`RULES`] followed by
//! `policy_data := <JSON>` ([`crate::model::PolicyData`]). [`Engine`] loads
//! the document exactly as the hardware measured it, evaluates its
//! `decision` rule for each request with [regorus], and turns the result into
//! a [`Decision`] that explains every denial.
//!
//! A document made of exactly this version's [`RULES`] and its data is
//! evaluated in regorus' compiled form (RVM bytecode, with the policy data
//! folded into one constant), several times faster than regorus'
//! tree-walking interpreter. The compiled form departs from Rego's
//! semantics in places (see the header of `rules.rego`); these rules avoid
//! those places, and the decision tests check, case by case and on tens of
//! thousands of mutated requests, that both forms decide alike. Any other
//! document (rules of another version, extra rules) is evaluated by the
//! interpreter, the reference semantics. [`Engine::decide_reference`]
//! always uses the interpreter.
//!
//! Under such a document, a `create_container` is first put to a native
//! check that transcribes the rules' `create_container_ok` in Rust
//! ([`Engine::fast_path_allows`], `engine/fast_path.rs`): the compiled form
//! still pays regorus' per-step overhead on every variable and mount, about
//! 200 µs on this machine for an ordinary container, the native check some
//! 15 µs. It only ever allows; a request it does not accept is decided, and
//! explained, by the compiled rules, so it can make a decision faster but
//! never different, and the tests hold it to that against the interpreter.
//!
//! The policy's regular expressions are matched here, not in Rego. regorus'
//! `regex.match` clones its cached `Regex` for every call, and a clone
//! starts with an empty matching cache, so every match rebuilt its lazy DFA
//! (about 20 µs for a mount source, against 0.2 µs on a `Regex` that keeps
//! its cache); and the compiled form takes no custom builtins that could
//! match in Rust instead. So [`Engine`] compiles every pattern of the policy
//! once at load (anchored `\A(?:P)\z`, as the rules describe; a container's
//! environment patterns as one [`regex::RegexSet`]), and before each
//! evaluation computes the matches the request needs and inserts them into
//! its own copy of the input under [`MATCHES_KEY`], replacing whatever the
//! host sent there. The rules run no regex and trust only those results;
//! the same document evaluated by another Rego engine, without them,
//! denies every request (the rules' `matches_ok`).
//!
//! Deciding never fails: anything that is not a clear, well-formed "allow"
//! (an evaluation error, an undefined or non-boolean result, a time limit
//! exceeded, a request too large) is a deny with a reason saying so, as
//! regorus' own `eval_allow_query` does.
//!
//! ```
//! use capsa_policy::engine::Engine;
//! use capsa_policy::model::{PolicyData, SandboxPolicy, SCHEMA_VERSION};
//!
//! let data = PolicyData { version: SCHEMA_VERSION, containers: vec![], sandbox: SandboxPolicy::default() };
//! let mut engine = Engine::from_data(&data).unwrap();
//! assert!(engine.decide(&serde_json::json!({"op": "shutdown"})).allowed);
//! let denied = engine.decide(&serde_json::json!({"op": "update_policy"}));
//! assert_eq!(denied.reasons[0].rule, "update_policy.permission");
//! ```
//!
//! Environment values never appear in a decision: the rules show entries as
//! `NAME=<redacted>`, and the engine scrubs every reason again after
//! evaluation (see [`Engine::decide`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::Program;
use regorus::rvm::RegoVM;
use regorus::rvm::vm::VmError;
use regorus::utils::limits::{ExecutionTimerConfig, LimitError, PolicyLengthConfig};
use serde::{Deserialize, Serialize};

use crate::model::{self, PolicyData};
use crate::request::Request;

mod fast_path;

/// The fixed rules of this capsa version (the first half of every document).
pub const RULES: &str = include_str!("rules.rego");

/// The rule the engine evaluates.
const DECISION_RULE: &str = "data.capsa.policy.decision";
/// The rule holding the policy data.
const DATA_RULE: &str = "data.capsa.policy.policy_data";
/// The file name regorus associates with the document in its errors.
const DOCUMENT_NAME: &str = "policy.rego";
/// The input key under which the engine passes the rules its regex matches
/// (see the module documentation). The engine sets it on every object
/// request, replacing any value the host sent; the typed request has no
/// such field, so a host that sends one is denied anyway.
pub const MATCHES_KEY: &str = "capsa_matches";
/// The regex crate's default limit on a compiled regular expression.
const REGEX_SIZE_LIMIT: usize = 10 * (1 << 20);

/// Largest document accepted (the rules plus data for a large pod).
const MAX_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;
/// Longest evaluation error text kept in a reason.
const MAX_ERROR_CHARS: usize = 400;
/// Values shorter than this are scrubbed only inside environment reasons
/// and as whole `NAME=value` entries: shorter strings cannot be told from
/// ordinary text (see [`Scrubber`]).
const MIN_SCRUB_LEN: usize = 4;

/// Bounds on what one decision may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request accepted, in bytes of JSON (approximately, for a
    /// [`serde_json::Value`]: strings and keys count their length, every
    /// other value a small constant).
    pub max_request_bytes: usize,
    /// Deepest nesting of arrays and objects accepted in a request.
    pub max_request_depth: usize,
    /// Wall-clock time one evaluation may take.
    pub time_limit: Duration,
    /// Bytecode instructions one evaluation may execute: a bound that,
    /// unlike time, does not depend on how busy the machine is.
    pub max_instructions: usize,
}

impl Default for Limits {
    /// 1 MiB, 32 levels, 250 ms, 5 million instructions: a request to
    /// create a container is a few KiB and decides in well under a
    /// millisecond, so these leave a margin of two to three orders of
    /// magnitude while bounding what a hostile host can make one request
    /// cost.
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            max_request_depth: 32,
            time_limit: Duration::from_millis(250),
            max_instructions: 5_000_000,
        }
    }
}

/// Why a policy document cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The document is larger than the engine accepts.
    #[error("the policy document is {size} bytes, more than the {limit} accepted")]
    DocumentTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The document is not valid Rego.
    #[error("the policy document is not valid Rego: {0}")]
    Parse(String),
    /// Evaluating `policy_data` failed.
    #[error("cannot evaluate policy_data in the policy document: {0}")]
    Eval(String),
    /// The document does not define `policy_data` in package `capsa.policy`.
    #[error("the policy document does not define policy_data in package capsa.policy")]
    NoPolicyData,
    /// `policy_data` does not have the shape of [`model::PolicyData`].
    #[error("policy_data in the policy document is not valid policy data: {0}")]
    Data(String),
    /// A regular expression in `policy_data` is not valid on its own.
    #[error("policy_data holds an invalid regular expression in {field}: {error}")]
    Pattern {
        /// Where: e.g. `containers[2].env.patterns[0]`.
        field: String,
        /// Why the regex crate refuses it.
        error: String,
    },
    /// The document cannot be compiled for evaluation.
    #[error("cannot compile the policy document: {0}")]
    Compile(String),
    /// The document does not define `decision` in package `capsa.policy`.
    #[error("the policy document does not define decision in package capsa.policy")]
    NoDecision,
    /// `policy_data` is of another schema version.
    #[error("policy_data has schema version {found}; this capsa reads version {expected}")]
    Version {
        /// The version in the document.
        found: serde_json::Value,
        /// [`model::SCHEMA_VERSION`].
        expected: u32,
    },
    /// The document could not be rendered from policy data (a capsa bug).
    #[error("cannot render a policy document: {0}")]
    Render(String),
}

/// The outcome of one request, with the reasons for a denial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why not: one entry per failed check (empty when allowed).
    pub reasons: Vec<Reason>,
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// The rule that denied, `<op>.<check>` (e.g. `create_container.env`),
    /// or `request.*`, `policy.*`, `engine.*` for the request, the policy
    /// data and the evaluation itself.
    pub rule: String,
    /// The request field concerned, e.g. `env[3]` or `layers[1]` (empty
    /// for the request as a whole).
    pub field: String,
    /// What the policy allows there.
    pub allowed: serde_json::Value,
    /// What was requested there.
    pub requested: serde_json::Value,
    /// One readable sentence.
    pub message: String,
}

impl Decision {
    fn allow() -> Self {
        Self { allowed: true, reasons: Vec::new() }
    }

    fn deny(reason: Reason) -> Self {
        Self { allowed: false, reasons: vec![reason] }
    }
}

impl Reason {
    fn new(rule: &str, field: &str, allowed: serde_json::Value, requested: serde_json::Value, message: String) -> Self {
        Self { rule: rule.to_owned(), field: field.to_owned(), allowed, requested, message }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allowed {
            return writeln!(f, "allowed");
        }
        let n = self.reasons.len();
        writeln!(f, "denied ({n} reason{})", if n == 1 { "" } else { "s" })?;
        for reason in &self.reasons {
            write!(f, "{reason}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Messages name the field themselves. Control characters (a
        // newline in a requested path) are shown escaped, one reason a line.
        let message: String = self
            .message
            .chars()
            .flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] })
            .collect();
        writeln!(f, "  {}: {message}", self.rule)?;
        writeln!(f, "      policy allows: {}", shown(&self.allowed))?;
        writeln!(f, "      requested:     {}", shown(&self.requested))
    }
}

/// A value in one line, cut short when long.
fn shown(value: &serde_json::Value) -> String {
    const MAX: usize = 200;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... ({} bytes)", text.get(..cut).unwrap_or_default(), text.len()),
        None => text,
    }
}

/// A compiled policy, ready to decide. Built once per sandbox; [`Engine::decide`]
/// is the hot path.
///
/// Deciding needs `&mut self` (the VM keeps evaluation state); the engine
/// is [`Clone`] and the compiled program is shared, so concurrent callers
/// can each hold a copy cheaply.
pub struct Engine {
    /// The interpreter, holding the parsed document: it evaluated
    /// `policy_data` at load and serves [`Engine::decide_reference`].
    interpreter: regorus::Engine,
    /// `decision` compiled to bytecode, for a document of exactly
    /// [`RULES`] and its data.
    compiled: Option<Compiled>,
    limits: Limits,
    /// Environment values of the policy, scrubbed from every reason.
    policy_env: Vec<String>,
    /// The policy's regular expressions, compiled once and shared by clones
    /// (a `Regex` keeps its matching caches, per thread, in a shared pool).
    matchers: Arc<Matchers>,
    data: PolicyData,
}

struct Compiled {
    program: Arc<Program>,
    vm: RegoVM,
}

impl Clone for Engine {
    fn clone(&self) -> Self {
        Self {
            interpreter: self.interpreter.clone(),
            compiled: self
                .compiled
                .as_ref()
                .map(|c| Compiled { program: Arc::clone(&c.program), vm: new_vm(&c.program, &self.limits) }),
            limits: self.limits,
            policy_env: self.policy_env.clone(),
            matchers: Arc::clone(&self.matchers),
            data: self.data.clone(),
        }
    }
}

fn timer(limits: &Limits) -> ExecutionTimerConfig {
    ExecutionTimerConfig { limit: limits.time_limit, check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN) }
}

fn new_vm(program: &Arc<Program>, limits: &Limits) -> RegoVM {
    let mut vm = RegoVM::new();
    vm.load_program(Arc::clone(program));
    vm.set_execution_timer_config(Some(timer(limits)));
    vm.set_max_instructions(limits.max_instructions);
    vm
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The policy data holds environment values: never print them.
        f.debug_struct("Engine").field("limits", &self.limits).field("containers", &self.data.containers.len()).finish()
    }
}

impl Engine {
    /// From a whole policy document (rules + `policy_data := ...`).
    ///
    /// The document is what the hardware measured, so it is evaluated as
    /// is, even if its rules differ from [`RULES`] (then by the
    /// interpreter: see the module documentation); it is refused only if it
    /// is not valid Rego, does not define `decision`, or does not define
    /// `policy_data` as valid policy data of [`model::SCHEMA_VERSION`].
    pub fn from_document(rego: &str) -> Result<Self, EngineError> {
        Self::from_document_with_limits(rego, Limits::default())
    }

    /// [`Engine::from_document`] with other limits.
    pub fn from_document_with_limits(rego: &str, limits: Limits) -> Result<Self, EngineError> {
        Self::load(rego, limits, Compile::IfRules)
    }

    fn load(rego: &str, limits: Limits, compile: Compile) -> Result<Self, EngineError> {
        if rego.len() > MAX_DOCUMENT_BYTES {
            return Err(EngineError::DocumentTooLarge { size: rego.len(), limit: MAX_DOCUMENT_BYTES });
        }
        let mut regorus = regorus::Engine::new();
        // The data may be rendered on long lines; the document's size is
        // bounded above, so line and column limits add nothing.
        regorus.set_policy_length_config(PolicyLengthConfig {
            max_col: NonZeroU32::new(u32::try_from(MAX_DOCUMENT_BYTES).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN),
            max_file_bytes: NonZeroUsize::new(MAX_DOCUMENT_BYTES).unwrap_or(NonZeroUsize::MIN),
            max_lines: NonZeroUsize::new(MAX_DOCUMENT_BYTES).unwrap_or(NonZeroUsize::MIN),
        });
        regorus.set_execution_timer_config(timer(&limits));
        regorus.add_policy(DOCUMENT_NAME.to_owned(), rego.to_owned()).map_err(|e| EngineError::Parse(e.to_string()))?;

        let value = match regorus.eval_rule(DATA_RULE.to_owned()) {
            Ok(regorus::Value::Undefined) => return Err(EngineError::NoPolicyData),
            Ok(value) => value,
            // A document without the rule at all is an error in regorus.
            Err(_) if !defines_policy_data(&mut regorus) => return Err(EngineError::NoPolicyData),
            Err(e) => return Err(EngineError::Eval(e.to_string())),
        };
        if !defines_decision(&mut regorus) {
            return Err(EngineError::NoDecision);
        }
        let json = serde_json::to_value(&value).map_err(|e| EngineError::Data(e.to_string()))?;
        let vetted = is_rules_and_data(rego, &json);
        let version = json.get("version").cloned().unwrap_or(serde_json::Value::Null);
        if version != model::SCHEMA_VERSION {
            return Err(EngineError::Version { found: version, expected: model::SCHEMA_VERSION });
        }
        let data: PolicyData = serde_json::from_value(json).map_err(|e| EngineError::Data(e.to_string()))?;
        check_unique(&data)?;
        check_workload_api(&data)?;
        let matchers = Arc::new(Matchers::compile(&data)?);
        let policy_env = policy_env_values(&data);

        let compiled = match compile {
            Compile::IfRules if !vetted => None,
            Compile::IfRules | Compile::Always => {
                let policy = regorus
                    .compile_with_entrypoint(&DECISION_RULE.into())
                    .map_err(|e| EngineError::Compile(e.to_string()))?;
                let program = Compiler::compile_from_policy(&policy, &[DECISION_RULE])
                    .map_err(|e| EngineError::Compile(e.to_string()))?;
                let vm = new_vm(&program, &limits);
                Some(Compiled { program, vm })
            }
        };
        Ok(Self { interpreter: regorus, compiled, limits, policy_env, matchers, data })
    }

    /// Whether decisions use the compiled form (the document is exactly
    /// [`RULES`] and its data) rather than the interpreter.
    pub fn is_compiled(&self) -> bool {
        self.compiled.is_some()
    }

    /// Convenience for tests and tools: [`RULES`] with `data` rendered as a
    /// document, exactly as [`crate::document::PolicyDocument::render`] does.
    pub fn from_data(data: &PolicyData) -> Result<Self, EngineError> {
        let document = crate::document::PolicyDocument::render(data).map_err(|e| EngineError::Render(e.to_string()))?;
        Self::from_document(document.rego())
    }

    /// The policy data of the loaded document.
    pub fn data(&self) -> &PolicyData {
        &self.data
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Decides one request, given as JSON in the shape of [`Request`].
    ///
    /// Infallible and fail-closed: the request is allowed only when the
    /// document's `decision` evaluates, within the time limit, to an object
    /// whose `allowed` is `true` and whose `reasons` are empty, and the
    /// request has the shape of a [`Request`]. Everything else is a deny
    /// whose reason says why.
    ///
    /// Every string of every reason is scrubbed of the environment values
    /// of the request and of the policy, whatever the rules returned.
    pub fn decide(&mut self, request: &serde_json::Value) -> Decision {
        let evaluator = if self.compiled.is_some() { Evaluator::FastPathThenCompiled } else { Evaluator::Interpreter };
        let decision = self.decide_unscrubbed(request, evaluator);
        if decision.allowed {
            return decision;
        }
        Scrubber::new(&self.policy_env, request).scrub(decision)
    }

    /// [`Engine::decide`] without the native fast path for
    /// `create_container` (see [`Engine::fast_path_allows`]): every request
    /// is evaluated by the rules, compiled or interpreted. For benchmarks
    /// and tests of the rules themselves.
    pub fn decide_by_rules(&mut self, request: &serde_json::Value) -> Decision {
        let evaluator = if self.compiled.is_some() { Evaluator::Compiled } else { Evaluator::Interpreter };
        let decision = self.decide_unscrubbed(request, evaluator);
        if decision.allowed {
            return decision;
        }
        Scrubber::new(&self.policy_env, request).scrub(decision)
    }

    /// Whether the native check allows `request` without evaluating the
    /// rules, as [`Engine::decide`] does first.
    ///
    /// Only a `create_container` can be allowed this way, only under a
    /// document of exactly [`RULES`] and its data (the one the check
    /// transcribes), and only when the request is within the limits and has
    /// the shape of a [`Request`]. Everything else, allowed or not, is
    /// decided by the rules. The check is never looser than the rules: the
    /// tests compare it with the interpreter (see `engine/fast_path.rs`).
    pub fn fast_path_allows(&self, request: &serde_json::Value) -> bool {
        measure(request, self.limits.max_request_bytes, self.limits.max_request_depth).is_ok()
            && self.fast_path(request)
    }

    /// [`Engine::fast_path_allows`] for a request already measured.
    fn fast_path(&self, request: &serde_json::Value) -> bool {
        if self.compiled.is_none() {
            return false;
        }
        if text(request, "op") != Some("create_container") {
            return false;
        }
        let Some(matchers) = text(request, "container").and_then(|name| self.matchers.containers.get(name)) else {
            return false;
        };
        let Some(container) = self.data.containers.get(matchers.index) else {
            return false;
        };
        fast_path::allows(container, matchers, request) && Request::deserialize(request).is_ok()
    }

    /// [`Engine::decide`] with regorus' interpreter instead of the compiled
    /// program: several times slower, and the reference the compiled
    /// decisions are tested against.
    pub fn decide_reference(&mut self, request: &serde_json::Value) -> Decision {
        let decision = self.decide_unscrubbed(request, Evaluator::Interpreter);
        if decision.allowed {
            return decision;
        }
        Scrubber::new(&self.policy_env, request).scrub(decision)
    }

    /// Decides a typed request.
    pub fn decide_request(&mut self, request: &Request) -> Decision {
        match serde_json::to_value(request) {
            Ok(json) => self.decide(&json),
            Err(e) => Decision::deny(Reason::new(
                "request.type",
                "",
                serde_json::Value::Null,
                serde_json::Value::Null,
                format!("the request cannot be represented as JSON: {e}"),
            )),
        }
    }

    /// Decides a request given as JSON text, refusing it before parsing
    /// when it is larger than the limit.
    pub fn decide_json(&mut self, json: &str) -> Decision {
        if json.len() > self.limits.max_request_bytes {
            return self.too_large(json.len());
        }
        match serde_json::from_str::<serde_json::Value>(json) {
            Ok(request) => self.decide(&request),
            Err(e) => Decision::deny(Reason::new(
                "request.type",
                "",
                "JSON".into(),
                serde_json::Value::Null,
                // Line and column only: serde's message could quote the text.
                format!("the request is not valid JSON (line {}, column {})", e.line(), e.column()),
            )),
        }
    }

    fn too_large(&self, size: usize) -> Decision {
        Decision::deny(Reason::new(
            "request.size",
            "",
            self.limits.max_request_bytes.into(),
            size.into(),
            format!("the request is about {size} bytes; the largest accepted is {}", self.limits.max_request_bytes),
        ))
    }

    fn decide_unscrubbed(&mut self, request: &serde_json::Value, evaluator: Evaluator) -> Decision {
        match measure(request, self.limits.max_request_bytes, self.limits.max_request_depth) {
            Ok(_) => {}
            Err(Oversize::Bytes(size)) => return self.too_large(size),
            Err(Oversize::Depth) => {
                return Decision::deny(Reason::new(
                    "request.depth",
                    "",
                    self.limits.max_request_depth.into(),
                    serde_json::Value::Null,
                    format!("the request nests deeper than {} levels", self.limits.max_request_depth),
                ));
            }
        }
        if matches!(evaluator, Evaluator::FastPathThenCompiled) && self.fast_path(request) {
            return Decision::allow();
        }
        let mut input = match regorus::Value::deserialize(request) {
            Ok(input) => input,
            Err(e) => return engine_error("engine.input", format!("cannot convert the request for evaluation: {e}")),
        };
        // Whatever the host sent under the key is replaced here, on the
        // engine's own copy. A request that is not an object gets none (the
        // rules deny it for its type).
        if let Ok(fields) = input.as_object_mut() {
            fields.insert(regorus::Value::from(MATCHES_KEY), self.matchers.input_value(request));
        }
        let mut decision = match (evaluator, self.compiled.as_mut()) {
            (Evaluator::Compiled | Evaluator::FastPathThenCompiled, Some(Compiled { vm, .. })) => {
                vm.set_input(input);
                let result = vm.execute_entry_point_by_name(DECISION_RULE);
                // Do not keep the request alive between decisions.
                vm.set_input(regorus::Value::Null);
                match result {
                    Ok(value) => interpret(&value),
                    Err(e) => vm_error(&e),
                }
            }
            _ => {
                self.interpreter.set_input(input);
                let result = self.interpreter.eval_rule(DECISION_RULE.to_owned());
                self.interpreter.set_input(regorus::Value::Null);
                match result {
                    Ok(value) => interpret(&value),
                    Err(e) => evaluation_error(&e),
                }
            }
        };
        if decision.allowed && Request::deserialize(request).is_err() {
            // Defense in depth: the rules check every field they use, but
            // the agent acts on the typed request, so nothing the rules did
            // not see (an unknown field, a field of another type) may pass.
            decision = Decision::deny(Reason::new(
                "request.shape",
                "",
                serde_json::Value::Null,
                serde_json::Value::Null,
                "the request does not have the shape of a host request (unknown or mistyped fields)".to_owned(),
            ));
        }
        decision
            .reasons
            .sort_by(|a, b| (a.rule.as_str(), field_key(&a.field)).cmp(&(b.rule.as_str(), field_key(&b.field))));
        decision
    }
}

/// The rules index containers by name and a container's mounts by
/// destination; a duplicate would make every request for it fail to
/// evaluate, so such data is refused at load with a clear error.
fn check_unique(data: &PolicyData) -> Result<(), EngineError> {
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in data.containers.iter().enumerate() {
        if !names.insert(c.name.as_str()) {
            return Err(EngineError::Data(format!("containers[{i}]: a second container named {:?}", c.name)));
        }
        let mut destinations = std::collections::BTreeSet::new();
        for (j, m) in c.mounts.iter().enumerate() {
            if !destinations.insert(m.destination.as_str()) {
                return Err(EngineError::Data(format!(
                    "containers[{i}].mounts[{j}]: a second mount at {:?}",
                    m.destination
                )));
            }
        }
    }
    Ok(())
}

/// An endpoint name the workload API does not have (a typo such as
/// `key-release`) would silently deny the pod what its author meant to
/// allow, so such data is refused at load, naming the endpoints there are.
fn check_workload_api(data: &PolicyData) -> Result<(), EngineError> {
    for (i, endpoint) in data.sandbox.workload_api.iter().enumerate() {
        if !model::WORKLOAD_API_ENDPOINTS.contains(&endpoint.as_str()) {
            return Err(EngineError::Data(format!(
                "sandbox.workload_api[{i}]: the workload API has no endpoint {endpoint:?}; it has: {}",
                model::WORKLOAD_API_ENDPOINTS.join(", ")
            )));
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Compile {
    /// Compile only a document of exactly [`RULES`] and its data.
    IfRules,
    /// Compile whatever the document is (tests of the compiled form).
    #[cfg_attr(not(test), allow(dead_code))]
    Always,
}

/// Whether `rego` is exactly [`RULES`] followed by `policy_data := <JSON>`
/// with nothing after it, the JSON being the data regorus evaluated: only
/// such a document has the rules the compiled form is tested against, and
/// no extra rule body can have been added to them.
fn is_rules_and_data(rego: &str, data: &serde_json::Value) -> bool {
    let tail = rego
        .strip_prefix(RULES.trim_end())
        .and_then(|rest| rest.trim_start().strip_prefix("policy_data"))
        .and_then(|rest| rest.trim_start().strip_prefix(":="));
    // serde_json refuses anything but whitespace after the value.
    tail.and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok()).is_some_and(|json| &json == data)
}

#[derive(Clone, Copy)]
enum Evaluator {
    /// The native check for `create_container` first (allow only), then
    /// the compiled rules.
    FastPathThenCompiled,
    Compiled,
    Interpreter,
}

/// The policy's regular expressions, compiled once at load, and the
/// matches they give for a request (see the module documentation).
struct Matchers {
    /// By container name.
    containers: HashMap<String, ContainerMatchers>,
    /// `sandbox.copy_file`, anchored.
    copy_file: RegexSet,
}

struct ContainerMatchers {
    /// The container's index in the policy data's `containers`.
    index: usize,
    /// `env.exact`: an entry listed exactly needs no pattern.
    env_exact: HashSet<String>,
    /// `env.patterns`, anchored, matched in one pass.
    env: RegexSet,
    /// The anchored source pattern of each mount that has one, by
    /// destination (destinations are unique in a container: [`check_unique`]).
    mount_sources: HashMap<String, Regex>,
}

impl Matchers {
    /// Checks that every regular expression of the policy is valid on its
    /// own, then compiles them anchored as `\A(?:P)\z`. A P that does not
    /// parse alone (such as `a)|(b`) could close the group and leave an
    /// alternative unanchored, so such a document is refused.
    fn compile(data: &PolicyData) -> Result<Self, EngineError> {
        let mut containers = HashMap::new();
        for (i, c) in data.containers.iter().enumerate() {
            for (j, p) in c.env.patterns.iter().enumerate() {
                check_pattern(&format!("containers[{i}].env.patterns[{j}]"), p)?;
            }
            let env = regex_set(&format!("containers[{i}].env.patterns"), &c.env.patterns)?;
            let mut mount_sources = HashMap::new();
            for (j, m) in c.mounts.iter().enumerate() {
                if let model::SourceMatch::Pattern(p) = &m.source {
                    let field = format!("containers[{i}].mounts[{j}].source.pattern");
                    check_pattern(&field, p)?;
                    let regex = RegexBuilder::new(&anchored(p)).build().map_err(|e| pattern_error(&field, &e))?;
                    mount_sources.insert(m.destination.clone(), regex);
                }
            }
            let env_exact = c.env.exact.iter().cloned().collect();
            containers.insert(c.name.clone(), ContainerMatchers { index: i, env_exact, env, mount_sources });
        }
        for (j, p) in data.sandbox.copy_file.iter().enumerate() {
            check_pattern(&format!("sandbox.copy_file[{j}]"), p)?;
        }
        let copy_file = regex_set("sandbox.copy_file", &data.sandbox.copy_file)?;
        Ok(Self { containers, copy_file })
    }

    /// The value of [`MATCHES_KEY`] for `request`, as the rules read it:
    /// `env` and `mounts`, one boolean per requested entry and mount of a
    /// `create_container` (empty otherwise), and `copy_file`, a boolean.
    ///
    /// An environment entry is true when it is a string that one of the
    /// container's patterns matches whole; an entry the container lists
    /// exactly is not matched (false), as the rules accept it first. A
    /// mount is true when its source is a string that the source pattern of
    /// the container's mount at its destination matches whole. The path
    /// checks (absolute, no `.` or `..`) are the rules' own.
    fn input_value(&self, request: &serde_json::Value) -> regorus::Value {
        let mut env = Vec::new();
        let mut mounts = Vec::new();
        let mut copy_file = false;
        match text(request, "op") {
            Some("create_container") => {
                if let Some(c) = text(request, "container").and_then(|name| self.containers.get(name)) {
                    if let Some(entries) = request.get("env").and_then(serde_json::Value::as_array) {
                        env = entries
                            .iter()
                            .map(|e| {
                                let matched = e.as_str().is_some_and(|e| !c.env_exact.contains(e) && c.env.is_match(e));
                                regorus::Value::from(matched)
                            })
                            .collect();
                    }
                    if let Some(requested) = request.get("mounts").and_then(serde_json::Value::as_array) {
                        mounts = requested
                            .iter()
                            .map(|m| {
                                let pattern = text(m, "destination").and_then(|d| c.mount_sources.get(d));
                                let matched = match (pattern, text(m, "source")) {
                                    (Some(pattern), Some(source)) => pattern.is_match(source),
                                    _ => false,
                                };
                                regorus::Value::from(matched)
                            })
                            .collect();
                    }
                }
            }
            Some("copy_file") => {
                copy_file = text(request, "path").is_some_and(|path| self.copy_file.is_match(path));
            }
            _ => {}
        }
        let fields: BTreeMap<regorus::Value, regorus::Value> = [
            ("env", regorus::Value::from(env)),
            ("mounts", regorus::Value::from(mounts)),
            ("copy_file", regorus::Value::from(copy_file)),
        ]
        .into_iter()
        .map(|(k, v)| (regorus::Value::from(k), v))
        .collect();
        regorus::Value::from(fields)
    }
}

/// The string at `key` of `value`, if `value` is an object that has one.
fn text<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(serde_json::Value::as_str)
}

/// `\A(?:P)\z`: P must match the whole text (see the rules' header).
fn anchored(pattern: &str) -> String {
    format!(r"\A(?:{pattern})\z")
}

/// Refuses a pattern that is not a valid regular expression on its own.
fn check_pattern(field: &str, pattern: &str) -> Result<(), EngineError> {
    Regex::new(pattern).map(drop).map_err(|e| pattern_error(field, &e))
}

/// The patterns, anchored, as one set. Its size limit grows with the number
/// of patterns, so that patterns each accepted alone are accepted together.
fn regex_set(field: &str, patterns: &[String]) -> Result<RegexSet, EngineError> {
    RegexSetBuilder::new(patterns.iter().map(|p| anchored(p)))
        .size_limit(REGEX_SIZE_LIMIT.saturating_mul(patterns.len().max(1)))
        .build()
        .map_err(|e| pattern_error(field, &e))
}

fn pattern_error(field: &str, error: &regex::Error) -> EngineError {
    // The error quotes the pattern, which may hold an environment value:
    // keep only its kind.
    let error = match error {
        regex::Error::Syntax(_) => "not a valid regular expression".to_owned(),
        regex::Error::CompiledTooBig(limit) => format!("larger than {limit} bytes compiled"),
        _ => "not accepted by the regex engine".to_owned(),
    };
    EngineError::Pattern { field: field.to_owned(), error }
}

fn vm_error(error: &VmError) -> Decision {
    match error {
        VmError::TimeLimitExceeded { elapsed, limit, .. } => engine_error(
            "engine.time_limit",
            format!("evaluation was stopped after {elapsed:?}, over the limit of {limit:?}"),
        ),
        VmError::InstructionLimitExceeded { limit, .. } => {
            engine_error("engine.limit", format!("evaluation was stopped after {limit} instructions, the limit"))
        }
        other => {
            let text: String = one_line(&other.to_string()).chars().take(MAX_ERROR_CHARS).collect();
            engine_error("engine.error", format!("evaluation failed: {text}"))
        }
    }
}

/// Whether the document declares `decision` in package `capsa.policy`.
fn defines_decision(regorus: &mut regorus::Engine) -> bool {
    let package = regorus.get_packages().map(|p| p.iter().any(|p| p == "data.capsa.policy")).unwrap_or(false);
    package && regorus.has_declared_rule_rooted_at(DOCUMENT_NAME, "decision").unwrap_or(false)
}

/// Whether the document declares `policy_data` (to tell "undefined" from
/// "absent" when evaluation fails).
fn defines_policy_data(regorus: &mut regorus::Engine) -> bool {
    let package = regorus.get_packages().map(|p| p.iter().any(|p| p == "data.capsa.policy")).unwrap_or(false);
    package && regorus.has_declared_rule_rooted_at(DOCUMENT_NAME, "policy_data").unwrap_or(false)
}

/// Turns the value of `decision` into a [`Decision`], failing closed.
fn interpret(value: &regorus::Value) -> Decision {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        allowed: serde_json::Value,
        reasons: Vec<Reason>,
    }
    if *value == regorus::Value::Undefined {
        return engine_error("engine.undefined", "the policy's decision is undefined for this request".to_owned());
    }
    let raw = serde_json::to_value(value).and_then(serde_json::from_value::<Raw>);
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            return engine_error(
                "engine.malformed",
                format!("the policy's decision is not an object of allowed and reasons: {e}"),
            );
        }
    };
    match raw.allowed {
        serde_json::Value::Bool(true) if raw.reasons.is_empty() => Decision::allow(),
        serde_json::Value::Bool(true) => Decision { allowed: false, reasons: raw.reasons },
        serde_json::Value::Bool(false) if raw.reasons.is_empty() => {
            engine_error("policy.denied", "the policy denied the request without naming a rule".to_owned())
        }
        serde_json::Value::Bool(false) => Decision { allowed: false, reasons: raw.reasons },
        other => {
            let mut reasons = raw.reasons;
            reasons.push(Reason::new(
                "engine.malformed",
                "",
                serde_json::Value::Null,
                serde_json::Value::Null,
                format!("the policy's decision has a non-boolean allowed ({})", json_type(&other)),
            ));
            Decision { allowed: false, reasons }
        }
    }
}

/// `error` is regorus' error type (anyhow's), seen through the standard
/// error trait so that this library does not depend on anyhow.
fn evaluation_error<E>(error: &E) -> Decision
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static> + fmt::Display,
{
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    let mut limit = None;
    while let Some(e) = source {
        if let Some(l) = e.downcast_ref::<LimitError>() {
            limit = Some(l);
            break;
        }
        source = e.source();
    }
    match limit {
        Some(LimitError::TimeLimitExceeded { elapsed, limit }) => engine_error(
            "engine.time_limit",
            format!("evaluation was stopped after {elapsed:?}, over the limit of {limit:?}"),
        ),
        Some(other) => engine_error("engine.limit", format!("evaluation exceeded a limit: {other}")),
        None => {
            let text = one_line(&error.to_string());
            let text: String = text.chars().take(MAX_ERROR_CHARS).collect();
            engine_error("engine.error", format!("evaluation failed: {text}"))
        }
    }
}

/// regorus' multi-line error text (with a source excerpt) as one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn engine_error(rule: &str, message: String) -> Decision {
    Decision::deny(Reason::new(rule, "", serde_json::Value::Null, serde_json::Value::Null, message))
}

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Sort key that puts `env[2]` before `env[10]`.
fn field_key(field: &str) -> (&str, u64, &str) {
    if let Some((name, rest)) = field.split_once('[') {
        if let Some((index, tail)) = rest.split_once(']') {
            if let Ok(index) = index.parse() {
                return (name, index, tail);
            }
        }
    }
    (field, 0, "")
}

enum Oversize {
    Bytes(usize),
    Depth,
}

/// The approximate JSON size of `value`, stopping as soon as it exceeds
/// `max_bytes` or nests deeper than `max_depth`.
fn measure(value: &serde_json::Value, max_bytes: usize, max_depth: usize) -> Result<usize, Oversize> {
    fn walk(
        value: &serde_json::Value,
        depth: usize,
        max_depth: usize,
        total: &mut usize,
        max: usize,
    ) -> Result<(), Oversize> {
        if depth > max_depth {
            return Err(Oversize::Depth);
        }
        *total = total.saturating_add(match value {
            serde_json::Value::String(s) => s.len().saturating_add(3),
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => 2,
            _ => 8,
        });
        if *total > max {
            return Err(Oversize::Bytes(*total));
        }
        match value {
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, depth + 1, max_depth, total, max)?;
                }
            }
            serde_json::Value::Object(fields) => {
                for (key, item) in fields {
                    *total = total.saturating_add(key.len().saturating_add(3));
                    walk(item, depth + 1, max_depth, total, max)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut total = 0;
    walk(value, 0, max_depth, &mut total, max_bytes)?;
    Ok(total)
}

/// The value part (after the first `=`) of each environment entry and
/// pattern of the policy.
fn policy_env_values(data: &PolicyData) -> Vec<String> {
    let mut values: Vec<String> = data
        .containers
        .iter()
        .flat_map(|c| c.env.exact.iter().chain(c.env.patterns.iter()))
        .filter_map(|e| e.split_once('=').map(|(_, v)| v.to_owned()))
        .filter(|v| !v.is_empty())
        .collect();
    values.sort();
    values.dedup();
    values
}

/// Removes environment values from reasons: the safety net under the
/// rules' own redaction, so that a rule that forgets to redact still cannot
/// leak a value.
///
/// In every string of every reason, a whole `NAME=value` entry (of the
/// request or of the policy) becomes `NAME=<redacted>` and any value of at
/// least [`MIN_SCRUB_LEN`] characters becomes `<redacted>`. In reasons about
/// the environment (`create_container.env*`), every string of `allowed` and
/// `requested` is moreover cut to its name (`NAME=<redacted>`), so that
/// values too short to scrub as text are covered there too.
struct Scrubber<'a> {
    /// Whole entries, with the length of their name.
    entries: Vec<(&'a str, usize)>,
    /// Values long enough to scrub as text, longest first.
    values: Vec<&'a str>,
}

impl<'a> Scrubber<'a> {
    fn new(policy_env: &'a [String], request: &'a serde_json::Value) -> Self {
        let mut entries = Vec::new();
        let mut values: Vec<&str> = policy_env.iter().map(String::as_str).collect();
        if let Some(env) = request.get("env").and_then(serde_json::Value::as_array) {
            for entry in env.iter().filter_map(serde_json::Value::as_str) {
                if let Some((name, value)) = entry.split_once('=') {
                    if !value.is_empty() {
                        entries.push((entry, name.len()));
                        values.push(value);
                    }
                }
            }
        }
        values.retain(|v| v.chars().count() >= MIN_SCRUB_LEN);
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self { entries, values }
    }

    fn scrub(&self, mut decision: Decision) -> Decision {
        for reason in &mut decision.reasons {
            let env_reason = reason.rule.starts_with("create_container.env");
            reason.rule = self.text(&reason.rule);
            reason.field = self.text(&reason.field);
            reason.message = self.text(&reason.message);
            self.value(&mut reason.allowed, env_reason);
            self.value(&mut reason.requested, env_reason);
        }
        decision
    }

    fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (entry, name_len) in &self.entries {
            if out.contains(entry) {
                let name = entry.get(..*name_len).unwrap_or_default();
                out = out.replace(entry, &format!("{name}=<redacted>"));
            }
        }
        for value in &self.values {
            if out.contains(value) {
                out = out.replace(value, "<redacted>");
            }
        }
        out
    }

    fn value(&self, value: &mut serde_json::Value, env_reason: bool) {
        match value {
            serde_json::Value::String(s) => {
                *s = if env_reason { redact_entry(s) } else { self.text(s) };
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.value(v, env_reason)),
            serde_json::Value::Object(fields) => {
                let scrubbed: serde_json::Map<String, serde_json::Value> = std::mem::take(fields)
                    .into_iter()
                    .map(|(k, mut v)| {
                        self.value(&mut v, env_reason);
                        (self.text(&k), v)
                    })
                    .collect();
                *fields = scrubbed;
            }
            _ => {}
        }
    }
}

/// `NAME=value` as `NAME=<redacted>`; already redacted and bare names stay.
fn redact_entry(entry: &str) -> String {
    match entry.split_once('=') {
        Some((name, value)) if value.starts_with("<redacted") => format!("{name}={value}"),
        Some((name, _)) => format!("{name}=<redacted>"),
        None => entry.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPolicy, EnvPolicy, SandboxPolicy, UserPolicy};

    fn container() -> ContainerPolicy {
        ContainerPolicy {
            name: "app".into(),
            image: "example.com/app:1".into(),
            image_digest: "sha256:aa".into(),
            layers: vec!["sha256:01".into(), "sha256:02".into()],
            args: vec!["/bin/app".into()],
            env: EnvPolicy {
                exact: vec!["PATH=/usr/bin".into(), "TOKEN=MARKER-secret-value".into()],
                patterns: vec!["LEVEL=(debug|info)".into()],
                required: vec![],
            },
            working_dir: "/".into(),
            user: UserPolicy::default(),
            capabilities: vec![],
            privileged: false,
            no_new_privileges: true,
            seccomp_profile_sha256: None,
            mounts: vec![],
            read_only_rootfs: false,
            sysctls: Default::default(),
            exec: vec![],
            signals: vec![15],
            read_stdio: true,
            write_stdin: false,
        }
    }

    fn data() -> PolicyData {
        PolicyData { version: model::SCHEMA_VERSION, containers: vec![container()], sandbox: SandboxPolicy::default() }
    }

    fn doc_with(decision: &str) -> String {
        let json = serde_json::to_string(&data()).unwrap();
        format!("package capsa.policy\n\nimport rego.v1\n\n{decision}\n\npolicy_data := {json}\n")
    }

    /// The document evaluated by the interpreter (as `from_document` does
    /// for rules other than [`RULES`]) and compiled (forced).
    fn both(document: &str) -> [Engine; 2] {
        both_with(document, Limits::default())
    }

    fn both_with(document: &str, limits: Limits) -> [Engine; 2] {
        let interpreted = Engine::from_document_with_limits(document, limits).unwrap();
        assert!(!interpreted.is_compiled());
        let compiled = Engine::load(document, limits, Compile::Always).unwrap();
        assert!(compiled.is_compiled());
        [interpreted, compiled]
    }

    fn shutdown() -> serde_json::Value {
        serde_json::json!({"op": "shutdown"})
    }

    #[test]
    fn runtime_error_denies() {
        // A rule conflict (two values for one complete rule) and a division
        // by zero: evaluation errors for the interpreter, undefined for the
        // compiled form. Either way: deny.
        for rule in [
            "x := 1 if input.op\nx := 2 if input.op\ndecision := {\"allowed\": x == 1, \"reasons\": []}",
            "decision := {\"allowed\": 1 / input.zero == 1, \"reasons\": []}",
        ] {
            let request = serde_json::json!({"op": "shutdown", "zero": 0});
            for mut engine in both(&doc_with(rule)) {
                let d = engine.decide(&request);
                assert!(!d.allowed);
                assert!(d.reasons[0].rule.starts_with("engine."), "{d}");
            }
        }
    }

    #[test]
    fn undefined_decision_denies() {
        for mut engine in both(&doc_with("decision := {\"allowed\": true, \"reasons\": []} if input.op == \"x\"")) {
            let d = engine.decide(&shutdown());
            assert!(!d.allowed);
            assert_eq!(d.reasons[0].rule, "engine.undefined");
            // Defined for "x", where only the engine's own shape check
            // denies: the deny above was the undefined result.
            let d = engine.decide(&serde_json::json!({"op": "x"}));
            assert_eq!(d.reasons[0].rule, "request.shape");
        }
    }

    #[test]
    fn a_document_without_decision_is_refused() {
        assert!(matches!(Engine::from_document(&doc_with("other := true")), Err(EngineError::NoDecision)));
    }

    #[test]
    fn non_boolean_allowed_denies() {
        for rule in ["decision := {\"allowed\": \"true\", \"reasons\": []}", "decision := true"] {
            for mut engine in both(&doc_with(rule)) {
                let d = engine.decide(&shutdown());
                assert!(!d.allowed);
                assert_eq!(d.reasons[0].rule, "engine.malformed");
            }
        }
    }

    #[test]
    fn allowed_with_reasons_or_denied_without_denies() {
        let reason = "{\"rule\": \"r\", \"field\": \"\", \"allowed\": null, \"requested\": null, \"message\": \"m\"}";
        for mut engine in both(&doc_with(&format!("decision := {{\"allowed\": true, \"reasons\": [{reason}]}}"))) {
            assert!(!engine.decide(&shutdown()).allowed);
        }
        for mut engine in both(&doc_with("decision := {\"allowed\": false, \"reasons\": []}")) {
            let d = engine.decide(&shutdown());
            assert!(!d.allowed);
            assert_eq!(d.reasons[0].rule, "policy.denied");
        }
    }

    #[test]
    fn a_permissive_document_still_cannot_pass_a_malformed_request() {
        for mut engine in both(&doc_with("decision := {\"allowed\": true, \"reasons\": []}")) {
            assert!(engine.decide(&shutdown()).allowed);
            let d = engine.decide(&serde_json::json!({"op": "signal_process", "container": "app", "signal": "9"}));
            assert!(!d.allowed);
            assert_eq!(d.reasons[0].rule, "request.shape");
        }
    }

    #[test]
    fn time_limit_denies() {
        let limits = Limits { time_limit: Duration::from_millis(5), ..Limits::default() };
        let document = doc_with(
            "n := count([1 | some i in numbers.range(0, 3000); some j in numbers.range(0, 3000)])\n\
             decision := {\"allowed\": n > 0, \"reasons\": []}",
        );
        for mut engine in both_with(&document, limits) {
            let d = engine.decide(&shutdown());
            assert!(!d.allowed);
            assert_eq!(d.reasons[0].rule, "engine.time_limit", "{d}");
        }
        // The instruction limit bounds the compiled form independently of
        // the machine's speed.
        let limits = Limits { max_instructions: 10_000, ..Limits::default() };
        let [_, mut compiled] = both_with(&document, limits);
        let d = compiled.decide(&shutdown());
        assert_eq!(d.reasons[0].rule, "engine.limit", "{d}");
    }

    #[test]
    fn only_the_rules_of_this_version_are_compiled() {
        let mut engine = Engine::from_data(&data()).unwrap();
        assert!(engine.is_compiled());
        assert!(!engine.decide(&serde_json::json!({"op": "update_policy"})).allowed);
        let document = crate::document::PolicyDocument::render(&data()).unwrap().rego().to_owned();
        // An extra rule body after the data is evaluated, as measured, by
        // the interpreter: here it allows everything.
        let mut extended = Engine::from_document(&format!("{document}\nop_ok if true\n")).unwrap();
        assert!(!extended.is_compiled());
        assert!(extended.decide(&serde_json::json!({"op": "update_policy"})).allowed);
        // Rules differing from RULES only in a comment: interpreted too.
        let edited = document.replacen("# capsa execution-policy rules", "# edited rules", 1);
        let mut edited = Engine::from_document(&edited).unwrap();
        assert!(!edited.is_compiled());
        assert!(!edited.decide(&serde_json::json!({"op": "update_policy"})).allowed);
    }

    #[test]
    fn oversized_and_deep_requests_are_refused() {
        let mut engine = Engine::from_data(&data()).unwrap();
        let big = "x".repeat(1024 * 1024);
        let d = engine.decide(&serde_json::json!({"op": "copy_file", "path": big}));
        assert_eq!(d.reasons[0].rule, "request.size");
        let d = engine.decide_json(&serde_json::json!({"op": "copy_file", "path": big}).to_string());
        assert_eq!(d.reasons[0].rule, "request.size");
        let mut deep = serde_json::json!(1);
        for _ in 0..40 {
            deep = serde_json::json!([deep]);
        }
        let d = engine.decide(&serde_json::json!({"op": "shutdown", "x": deep}));
        assert_eq!(d.reasons[0].rule, "request.depth");
    }

    #[test]
    fn documents_without_valid_data_are_refused() {
        let rules_only = format!("{RULES}\n");
        assert!(matches!(Engine::from_document(&rules_only), Err(EngineError::NoPolicyData)));
        let mut other = data();
        other.version = 2;
        let doc = format!("{RULES}\npolicy_data := {}\n", serde_json::to_string(&other).unwrap());
        assert!(matches!(Engine::from_document(&doc), Err(EngineError::Version { .. })));
        let doc = format!("{RULES}\npolicy_data := {{\"version\": 1}}\n");
        assert!(matches!(Engine::from_document(&doc), Err(EngineError::Data(_))));
        let mut twice = data();
        twice.containers.push(container());
        assert!(matches!(Engine::from_data(&twice), Err(EngineError::Data(_))));
        let mut bad = data();
        bad.containers[0].env.patterns.push("A=x)|(.*".into());
        assert!(matches!(Engine::from_data(&bad), Err(EngineError::Pattern { .. })));
        assert!(matches!(Engine::from_document("package"), Err(EngineError::Parse(_))));
        let doc = format!("package other\npolicy_data := {}\n", serde_json::to_string(&data()).unwrap());
        assert!(matches!(Engine::from_document(&doc), Err(EngineError::NoPolicyData)));
    }

    #[test]
    fn workload_api_endpoints_are_checked_at_load_and_default_to_all() {
        let mut typo = data();
        typo.sandbox.workload_api = vec!["status".into(), "key-release".into()];
        let error = Engine::from_data(&typo).unwrap_err().to_string();
        assert!(error.contains("sandbox.workload_api[1]") && error.contains("key/release"), "{error}");

        // Data without the field (written before it existed): both the model
        // and the rules allow every endpoint, compiled or interpreted.
        let mut json = serde_json::to_value(data()).unwrap();
        json["sandbox"].as_object_mut().unwrap().remove("workload_api");
        let doc = format!("{}\n\npolicy_data := {json:#}\n", RULES.trim_end());
        let mut engine = Engine::from_document(&doc).unwrap();
        assert!(engine.is_compiled());
        assert_eq!(engine.data().sandbox.workload_api, model::WORKLOAD_API_ENDPOINTS);
        for endpoint in model::WORKLOAD_API_ENDPOINTS {
            let request = serde_json::json!({"op": "workload_api", "endpoint": endpoint});
            assert!(engine.decide(&request).allowed, "{endpoint}");
            assert!(engine.decide_reference(&request).allowed, "{endpoint}");
        }
        let unknown = serde_json::json!({"op": "workload_api", "endpoint": "attest/other"});
        let denied = engine.decide(&unknown);
        assert_eq!(denied, engine.decide_reference(&unknown));
        assert_eq!(denied.reasons[0].rule, "workload_api.endpoint");
        assert!(denied.reasons[0].message.contains("status, attest/raw, attest/maa, key/release"), "{denied}");
    }

    #[test]
    fn the_scrubber_catches_what_a_careless_rule_would_leak() {
        // A document whose rules echo the request's env verbatim.
        let mut engines = both(&doc_with(
            "decision := {\"allowed\": false, \"reasons\": [{\"rule\": \"leaky\", \"field\": \"\", \
             \"allowed\": data.capsa.policy.policy_data.containers[0].env.exact, \"requested\": input.env, \
             \"message\": sprintf(\"%v %v\", [input.env, data.capsa.policy.policy_data.containers[0].env])}]}",
        ));
        for engine in &mut engines {
            let d = engine.decide(&serde_json::json!({"op": "x", "env": ["A=xyz", "B=MARKER-request-secret"]}));
            let text = serde_json::to_string(&d).unwrap() + &d.to_string();
            assert!(!text.contains("MARKER"), "{text}");
            assert!(!text.contains("xyz"), "{text}");
            assert!(text.contains("A=<redacted>"), "{text}");
        }
    }

    /// The rules redact on their own: even without the engine's scrubber,
    /// no environment value of the request or the policy reaches a reason.
    #[test]
    fn the_rules_redact_without_the_scrubber() {
        let mut policy = data();
        policy.containers[0].env.patterns.push("SESSION=MARKER-[0-9]+".into());
        policy.containers[0].env.required.push("TOKEN".into());
        let mut engine = Engine::from_data(&policy).unwrap();
        let base = serde_json::json!({
            "op": "create_container", "container": "app", "image": "sha256:aa",
            "layers": ["sha256:01", "sha256:02"], "args": ["/bin/app"],
            "env": ["PATH=/usr/bin", "TOKEN=MARKER-secret-value", "LEVEL=info", "SESSION=MARKER-42"],
            "working_dir": "/", "user": {"uid": 0, "gid": 0, "groups": []}, "capabilities": [],
            "privileged": false, "no_new_privileges": true, "mounts": [], "read_only_rootfs": false,
        });
        assert!(engine.decide(&base).allowed, "{}", engine.decide(&base));
        let envs = [
            serde_json::json!(["PATH=/usr/bin", "TOKEN=MARKER-secret-value", "EXTRA=MARKER-extra"]),
            serde_json::json!(["PATH=/usr/bin", "TOKEN=MARKER-other-value"]),
            serde_json::json!(["TOKEN=MARKER-secret-value", "LEVEL=debug\nMARKER=1"]),
            serde_json::json!(["TOKEN=MARKER-secret-value", "SESSION=MARKER-abc"]),
            serde_json::json!(["PATH=/usr/bin"]),
            serde_json::json!("TOKEN=MARKER-secret-value"),
            serde_json::json!(["TOKEN=MARKER-secret-value", 7, {"MARKER": "MARKER"}]),
        ];
        for env in envs {
            let mut request = base.clone();
            request["env"] = env.clone();
            for evaluator in [Evaluator::Compiled, Evaluator::Interpreter] {
                let d = engine.decide_unscrubbed(&request, evaluator);
                assert!(!d.allowed, "{env}");
                assert!(d.reasons.iter().any(|r| r.rule.starts_with("create_container.env")), "{env}: {d}");
                let text = serde_json::to_string(&d).unwrap() + &d.to_string();
                assert!(!text.contains("MARKER"), "{env}: {text}");
            }
        }
    }

    /// The rules evaluated without the engine's matches (as another Rego
    /// engine would) deny every request, even one capsa allows.
    #[test]
    fn the_rules_without_the_engine_matches_deny() {
        let mut policy = data();
        policy.containers[0].mounts.push(model::MountPolicy {
            destination: "/etc/hosts".into(),
            fs_type: "bind".into(),
            source: model::SourceMatch::Pattern("/run/capsa/sandboxes/[0-9a-f]{4}/hosts".into()),
            options: vec!["ro".into()],
        });
        policy.sandbox.copy_file.push("/run/capsa/copy/[a-z]+".into());
        policy.sandbox.shutdown = true;
        let mut engine = Engine::from_data(&policy).unwrap();
        let document = crate::document::PolicyDocument::render(&policy).unwrap().rego().to_owned();
        let create = serde_json::json!({
            "op": "create_container", "container": "app", "image": "sha256:aa",
            "layers": ["sha256:01", "sha256:02"], "args": ["/bin/app"],
            "env": ["PATH=/usr/bin", "LEVEL=info"],
            "working_dir": "/", "user": {"uid": 0, "gid": 0, "groups": []}, "capabilities": [],
            "privileged": false, "no_new_privileges": true, "read_only_rootfs": false,
            "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/run/capsa/sandboxes/0a1b/hosts", "options": ["ro"]}],
        });
        let copy = serde_json::json!({"op": "copy_file", "path": "/run/capsa/copy/abc"});
        for request in [create, copy, shutdown()] {
            assert!(engine.decide(&request).allowed, "{}", engine.decide(&request));
            assert!(engine.decide_reference(&request).allowed);
            let mut other = regorus::Engine::new();
            other.add_policy(DOCUMENT_NAME.to_owned(), document.clone()).unwrap();
            other.set_input(regorus::Value::deserialize(&request).unwrap());
            let value = serde_json::to_value(other.eval_rule(DECISION_RULE.to_owned()).unwrap()).unwrap();
            assert_eq!(value["allowed"], false, "{request}");
            let rules: Vec<&str> =
                value["reasons"].as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
            assert!(rules.contains(&"engine.matches"), "{value}");
        }
    }

    #[test]
    fn engines_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Engine>();
        let engine = Engine::from_data(&data()).unwrap();
        let mut copy = engine.clone();
        std::thread::spawn(move || assert!(copy.decide(&serde_json::json!({"op": "shutdown"})).allowed))
            .join()
            .unwrap();
    }

    #[test]
    fn display_explains() {
        let mut engine = Engine::from_data(&data()).unwrap();
        let d = engine.decide(&serde_json::json!({"op": "write_stdin", "container": "app"}));
        let text = d.to_string();
        assert!(text.starts_with("denied (1 reason)"), "{text}");
        assert!(text.contains("  write_stdin.permission: the policy does not allow write_stdin"), "{text}");
        assert_eq!(Decision::allow().to_string(), "allowed\n");
    }
}
