//! Secure key release policies in the Azure Key Vault / Managed HSM language:
//! parsing into a validated tree, the canonical JSON form, and evaluation
//! against the claims of a verified attestation token.
//!
//! The trust service speaks the language Azure already defines (an Azure
//! Policy style `anyOf` of authorities, each an `allOf` or `anyOf` of claim
//! conditions) so that a policy written for Azure Key Vault releases the same
//! key here, and one written here can be handed to Azure unchanged. Azure
//! documents the grammar but not every corner of its semantics; where it is
//! silent this module picks the stricter reading and says so, because a
//! release policy that holds by accident gives a key away.
//!
//! Evaluation fails closed: an absent claim fails every operator except
//! `exists: false`, and a claim of the wrong type fails, `notEquals`
//! included. A [`Denial`] names, for every authority, the clause that did not
//! hold and what the token carried instead, so an operator can fix either the
//! policy or the workload without guessing.
//!
//! Value rules (Azure leaves them open; these are ours):
//! - `equals` / `notEquals` compare a policy string with a string claim
//!   exactly (case-sensitive), a policy number with a numeric claim by value
//!   (`2` equals `2.0`), a policy boolean with a boolean claim. The one
//!   cross-type case allowed is a policy string `"true"` or `"false"`
//!   (lowercase) against a boolean claim, since policies written for Azure
//!   often quote booleans. Every other pairing is a type mismatch.
//! - `less`, `lessOrEquals`, `greater` and `greaterOrEquals` take a number in
//!   the policy (refused at parse time otherwise) and hold only for a numeric
//!   claim; integers compare exactly, anything with a fraction as `f64`.
//! - `exists` takes `true` (the claim is present, whatever its value, `null`
//!   included) or `false` (it is absent).
//! - Claim names: in version `1.0.0` a claim names a top-level claim. In
//!   `1.2.0` a dotted name such as `x-ms-runtime.client-payload.nonce`
//!   descends into nested objects, unless a top-level claim has that literal
//!   dotted name, which wins.
//! - An authority matches a token issuer when they are equal after removing
//!   one trailing `/` from each, with scheme and host compared
//!   case-insensitively and the path exactly, so `https://trust.example/sim`
//!   never matches the authority `https://trust.example`. Default ports are
//!   not normalised: `https://a:443` and `https://a` differ.

use std::cmp::Ordering;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The deepest nesting of condition lists accepted: an authority's own list
/// is level 1, each nested `anyOf` / `allOf` adds one.
pub const MAX_DEPTH: usize = 16;

/// The most conditions (claim conditions and nested groups together) one
/// policy may hold, so that evaluation time is bounded by the policy, not by
/// whoever wrote it.
pub const MAX_CONDITIONS: usize = 1024;

/// The most authorities one policy may list.
pub const MAX_AUTHORITIES: usize = 64;

/// How many characters of a token value (or issuer) a [`Denial`] shows.
/// Claims are not secrets, but a denial goes to logs and to the requester,
/// and must never carry a whole token.
pub const MAX_SHOWN_CHARS: usize = 128;

/// The operators, as a list for error messages.
const OPERATOR_LIST: &str = "equals, notEquals, less, lessOrEquals, greater, greaterOrEquals, exists";

/// Why a release policy was refused. Every variant that points into the
/// document carries its JSON path, such as `anyOf[0].allOf[2]`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleasePolicyError {
    /// The bytes are not one JSON value.
    #[error("release policy is not valid JSON ({0}); send a single JSON object")]
    Json(serde_json::Error),
    /// A value has the wrong JSON type.
    #[error("{path}: expected {expected}, found {found}")]
    WrongType {
        /// Where in the policy.
        path: String,
        /// The type wanted.
        expected: &'static str,
        /// The type present.
        found: &'static str,
    },
    /// An object has a key the grammar does not know.
    #[error("{path}: unknown key {key:?} (expected {expected})")]
    UnknownKey {
        /// The object holding the key.
        path: String,
        /// The key as written.
        key: String,
        /// The keys allowed there.
        expected: &'static str,
    },
    /// A key appears twice; keys match case-insensitively, so `allOf` and
    /// `AllOf` are the same key.
    #[error("{path}: key {key:?} appears more than once (keys are case-insensitive); keep one")]
    DuplicateKey {
        /// The object holding the key.
        path: String,
        /// The key, in canonical spelling.
        key: &'static str,
    },
    /// A required key is missing.
    #[error("{path}: missing {what}")]
    MissingKey {
        /// The object missing it.
        path: String,
        /// What is missing, quoted as it should be written.
        what: &'static str,
    },
    /// Two keys that exclude each other are both present.
    #[error("{path}: {first:?} and {second:?} cannot both appear; keep one")]
    ConflictingKeys {
        /// The object holding them.
        path: String,
        /// One key, canonical spelling.
        first: &'static str,
        /// The other key, canonical spelling.
        second: &'static str,
    },
    /// A claim condition has a key that is not an operator.
    #[error("{path}: {key:?} is not an operator (expected one of {OPERATOR_LIST})")]
    NotAnOperator {
        /// The claim condition.
        path: String,
        /// The key as written.
        key: String,
    },
    /// A claim condition has more than one operator.
    #[error("{path}: claim condition has two operators, {first:?} and {second:?}; keep exactly one")]
    TwoOperators {
        /// The claim condition.
        path: String,
        /// The first operator.
        first: &'static str,
        /// The second operator.
        second: &'static str,
    },
    /// A claim condition has no operator.
    #[error("{path}: claim condition has no operator; add one of {OPERATOR_LIST}")]
    NoOperator {
        /// The claim condition.
        path: String,
    },
    /// A condition list is empty; Azure refuses those, and an empty `anyOf`
    /// would otherwise be a deny nobody meant while an empty `allOf` would
    /// release to anyone.
    #[error("{path}: {key:?} is empty; list at least one entry")]
    EmptyList {
        /// The object holding the list.
        path: String,
        /// The list's key.
        key: &'static str,
    },
    /// The policy version is not one this module implements.
    #[error("version: {found:?} is not supported (expected \"1.0.0\" or \"1.2.0\")")]
    UnsupportedVersion {
        /// The version as written.
        found: String,
    },
    /// An operator's operand has the wrong type.
    #[error("{path}: {operator:?} needs {expected}, found {found}")]
    BadOperand {
        /// The claim condition.
        path: String,
        /// The operator.
        operator: &'static str,
        /// The operand type it takes.
        expected: &'static str,
        /// The operand type present.
        found: &'static str,
    },
    /// A claim name or authority is the empty string.
    #[error("{path}: {what} is empty")]
    EmptyString {
        /// The object holding it.
        path: String,
        /// Which key.
        what: &'static str,
    },
    /// An authority is not a URL that can be compared with a token issuer.
    #[error("{path}: authority {found:?} is not of the form scheme://host[/path]")]
    BadAuthority {
        /// The authority object.
        path: String,
        /// The authority as written.
        found: String,
    },
    /// Condition lists nest too deeply.
    #[error("{path}: conditions nest deeper than {limit} levels; flatten the policy")]
    TooDeep {
        /// The list that is one level too deep.
        path: String,
        /// The limit.
        limit: usize,
    },
    /// The policy has too many conditions.
    #[error("policy has more than {limit} conditions; simplify it")]
    TooManyConditions {
        /// The limit.
        limit: usize,
    },
    /// The policy lists too many authorities.
    #[error("anyOf: policy lists more than {limit} authorities; simplify it")]
    TooManyAuthorities {
        /// The limit.
        limit: usize,
    },
}

/// The policy language versions understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyVersion {
    /// `1.0.0`: claim names are top-level claims.
    V1_0_0,
    /// `1.2.0`: claim names may be dotted paths into nested claims.
    V1_2_0,
}

impl PolicyVersion {
    /// The version as written in a policy.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1_0_0 => "1.0.0",
            Self::V1_2_0 => "1.2.0",
        }
    }
}

/// A claim condition operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operator {
    /// The claim equals the value.
    Equals,
    /// The claim is present, of a comparable type, and differs from the value.
    NotEquals,
    /// The numeric claim is less than the value.
    Less,
    /// The numeric claim is at most the value.
    LessOrEquals,
    /// The numeric claim is greater than the value.
    Greater,
    /// The numeric claim is at least the value.
    GreaterOrEquals,
    /// The claim is present (`true`) or absent (`false`).
    Exists,
}

impl Operator {
    /// Every operator, in the order the grammar lists them.
    pub const ALL: [Operator; 7] = [
        Self::Equals,
        Self::NotEquals,
        Self::Less,
        Self::LessOrEquals,
        Self::Greater,
        Self::GreaterOrEquals,
        Self::Exists,
    ];

    /// The operator's key, in canonical spelling.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Equals => "equals",
            Self::NotEquals => "notEquals",
            Self::Less => "less",
            Self::LessOrEquals => "lessOrEquals",
            Self::Greater => "greater",
            Self::GreaterOrEquals => "greaterOrEquals",
            Self::Exists => "exists",
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated secure key release policy. It can only be had from
/// [`ReleasePolicy::parse`], so holding one means the document was well
/// formed and within the limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleasePolicy {
    version: PolicyVersion,
    authorities: Vec<Authority>,
}

#[derive(Debug, Clone, PartialEq)]
struct Authority {
    authority: String,
    group: Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combinator {
    AllOf,
    AnyOf,
}

impl Combinator {
    fn key(self) -> &'static str {
        match self {
            Self::AllOf => "allOf",
            Self::AnyOf => "anyOf",
        }
    }
}

/// A condition list. Kept non-empty by construction (`first` + `rest`) so
/// that evaluating an `anyOf` always has a failure to report.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    combinator: Combinator,
    first: Box<Condition>,
    rest: Vec<Condition>,
}

impl Group {
    fn conditions(&self) -> impl Iterator<Item = &Condition> {
        std::iter::once(&*self.first).chain(&self.rest)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Claim(ClaimCondition),
    Group(Group),
}

#[derive(Debug, Clone, PartialEq)]
struct ClaimCondition {
    claim: String,
    test: Test,
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Equals(Scalar),
    NotEquals(Scalar),
    Less(Number),
    LessOrEquals(Number),
    Greater(Number),
    GreaterOrEquals(Number),
    Exists(bool),
}

impl Test {
    fn operator(&self) -> Operator {
        match self {
            Self::Equals(_) => Operator::Equals,
            Self::NotEquals(_) => Operator::NotEquals,
            Self::Less(_) => Operator::Less,
            Self::LessOrEquals(_) => Operator::LessOrEquals,
            Self::Greater(_) => Operator::Greater,
            Self::GreaterOrEquals(_) => Operator::GreaterOrEquals,
            Self::Exists(_) => Operator::Exists,
        }
    }

    fn operand(&self) -> Value {
        match self {
            Self::Equals(s) | Self::NotEquals(s) => s.to_json(),
            Self::Less(n) | Self::LessOrEquals(n) | Self::Greater(n) | Self::GreaterOrEquals(n) => {
                Value::Number(n.clone())
            }
            Self::Exists(b) => Value::Bool(*b),
        }
    }

    /// Whether the test holds for the claim's value (`None`: absent).
    fn holds(&self, actual: Option<&Value>) -> bool {
        let Some(actual) = actual else {
            return matches!(self, Self::Exists(false));
        };
        match self {
            Self::Exists(present) => *present,
            Self::Equals(expected) => expected.equals(actual) == Some(true),
            Self::NotEquals(expected) => expected.equals(actual) == Some(false),
            Self::Less(n) => compare_claim(actual, n) == Some(Ordering::Less),
            Self::LessOrEquals(n) => matches!(compare_claim(actual, n), Some(Ordering::Less | Ordering::Equal)),
            Self::Greater(n) => compare_claim(actual, n) == Some(Ordering::Greater),
            Self::GreaterOrEquals(n) => {
                matches!(compare_claim(actual, n), Some(Ordering::Greater | Ordering::Equal))
            }
        }
    }
}

/// An `equals` / `notEquals` operand.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    String(String),
    Number(Number),
    Bool(bool),
}

impl Scalar {
    fn to_json(&self) -> Value {
        match self {
            Self::String(s) => Value::String(s.clone()),
            Self::Number(n) => Value::Number(n.clone()),
            Self::Bool(b) => Value::Bool(*b),
        }
    }

    /// `Some(equal?)` when the claim is comparable with the operand, `None`
    /// on a type mismatch (which fails both `equals` and `notEquals`).
    fn equals(&self, claim: &Value) -> Option<bool> {
        match (self, claim) {
            (Self::String(s), Value::String(c)) => Some(s == c),
            // Azure policies often quote booleans; accept exactly the two
            // spellings JSON itself uses, nothing looser.
            (Self::String(s), Value::Bool(c)) => match s.as_str() {
                "true" => Some(*c),
                "false" => Some(!*c),
                _ => None,
            },
            (Self::Number(n), Value::Number(c)) => compare_numbers(c, n).map(|o| o == Ordering::Equal),
            (Self::Bool(b), Value::Bool(c)) => Some(b == c),
            _ => None,
        }
    }
}

fn compare_claim(claim: &Value, operand: &Number) -> Option<Ordering> {
    match claim {
        Value::Number(c) => compare_numbers(c, operand),
        _ => None,
    }
}

/// Integers compare exactly (an `f64` loses precision above 2^53, where
/// security version numbers and timestamps could live); anything else as
/// `f64`.
fn compare_numbers(a: &Number, b: &Number) -> Option<Ordering> {
    fn integer(n: &Number) -> Option<i128> {
        n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))
    }
    match (integer(a), integer(b)) {
        (Some(a), Some(b)) => Some(a.cmp(&b)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// Which authority a policy released under.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Release {
    /// The authority's index in the policy's `anyOf`.
    pub authority_index: usize,
    /// The authority, as written in the policy.
    pub authority: String,
}

/// Why a policy did not release: one entry per authority, in policy order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Denial {
    /// Why each authority did not hold.
    pub authorities: Vec<AuthorityDenial>,
}

/// Why one authority did not hold.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AuthorityDenial {
    /// The authority's index in the policy's `anyOf`.
    pub index: usize,
    /// The authority, as written in the policy.
    pub authority: String,
    /// What failed.
    pub reason: DenialReason,
}

/// What failed for one authority.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DenialReason {
    /// The token was issued by someone else; its claims were not looked at.
    IssuerMismatch {
        /// The token's issuer, JSON-quoted and truncated to
        /// [`MAX_SHOWN_CHARS`].
        issuer: String,
    },
    /// The issuer matched but a clause did not hold.
    Clause(FailedClause),
}

/// The first clause that did not hold. Under an `anyOf`, every alternative
/// failed and the first alternative's failure is the one reported.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FailedClause {
    /// The clause's JSON path in the policy, such as `anyOf[0].allOf[2]`.
    pub path: String,
    /// The claim name.
    pub claim: String,
    /// The operator.
    pub operator: Operator,
    /// The policy's operand, as JSON.
    pub expected: String,
    /// The token's value for the claim as JSON truncated to
    /// [`MAX_SHOWN_CHARS`], or `None` when the claim is absent.
    pub actual: Option<String>,
}

impl fmt::Display for FailedClause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: claim {:?} {} {} does not hold: ", self.path, self.claim, self.operator, self.expected)?;
        match &self.actual {
            Some(actual) => write!(f, "token has {actual}"),
            None => f.write_str("claim absent from token"),
        }
    }
}

impl fmt::Display for AuthorityDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "authority[{}] {:?}: ", self.index, self.authority)?;
        match &self.reason {
            DenialReason::IssuerMismatch { issuer } => write!(f, "token issuer {issuer} does not match"),
            DenialReason::Clause(clause) => clause.fmt(f),
        }
    }
}

/// One line per authority.
impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self.authorities.iter();
        if let Some(first) = lines.next() {
            first.fmt(f)?;
        }
        for line in lines {
            writeln!(f)?;
            line.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for Denial {}

impl ReleasePolicy {
    /// Parses and validates a policy document.
    ///
    /// Keys match case-insensitively, as Azure's do; unknown keys, duplicate
    /// keys, empty lists and values of the wrong type are refused. The caller
    /// bounds the byte length; this bounds nesting ([`MAX_DEPTH`]) and size
    /// ([`MAX_CONDITIONS`], [`MAX_AUTHORITIES`]).
    ///
    /// # Errors
    /// [`ReleasePolicyError`], naming the JSON path of the offending part.
    pub fn parse(json: &[u8]) -> Result<Self, ReleasePolicyError> {
        let raw: Raw = serde_json::from_slice(json).map_err(ReleasePolicyError::Json)?;
        Parser { conditions: 0 }.policy(&raw)
    }

    /// The policy in canonical form: canonical key spelling, nothing else.
    /// [`ReleasePolicy::parse`] of its serialisation gives back an equal
    /// policy.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("version".to_owned(), Value::String(self.version.as_str().to_owned()));
        let authorities = self
            .authorities
            .iter()
            .map(|a| {
                let mut map = Map::new();
                map.insert("authority".to_owned(), Value::String(a.authority.clone()));
                map.insert(a.group.combinator.key().to_owned(), group_json(&a.group));
                Value::Object(map)
            })
            .collect();
        map.insert("anyOf".to_owned(), Value::Array(authorities));
        Value::Object(map)
    }

    /// The policy's version.
    #[must_use]
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    /// The authorities, in policy order.
    pub fn authorities(&self) -> impl Iterator<Item = &str> {
        self.authorities.iter().map(|a| a.authority.as_str())
    }

    /// Evaluates the policy for a verified token's issuer and claims.
    ///
    /// Authorities are tried in order; the first whose issuer matches and
    /// whose conditions hold releases.
    ///
    /// # Errors
    /// [`Denial`] when no authority holds, saying why for each.
    pub fn evaluate(&self, issuer: &str, claims: &Map<String, Value>) -> Result<Release, Denial> {
        let mut denials = Vec::with_capacity(self.authorities.len());
        for (index, authority) in self.authorities.iter().enumerate() {
            let reason = if authority_matches(&authority.authority, issuer) {
                let path = format!("anyOf[{index}]");
                match self.group_holds(&authority.group, &path, claims) {
                    Ok(()) => return Ok(Release { authority_index: index, authority: authority.authority.clone() }),
                    Err(clause) => DenialReason::Clause(clause),
                }
            } else {
                DenialReason::IssuerMismatch { issuer: shown(&Value::String(issuer.to_owned())) }
            };
            denials.push(AuthorityDenial { index, authority: authority.authority.clone(), reason });
        }
        Err(Denial { authorities: denials })
    }

    fn group_holds(&self, group: &Group, path: &str, claims: &Map<String, Value>) -> Result<(), FailedClause> {
        let key = group.combinator.key();
        match group.combinator {
            Combinator::AllOf => {
                for (i, condition) in group.conditions().enumerate() {
                    self.condition_holds(condition, &format!("{path}.{key}[{i}]"), claims)?;
                }
                Ok(())
            }
            Combinator::AnyOf => {
                let Err(failure) = self.condition_holds(&group.first, &format!("{path}.{key}[0]"), claims) else {
                    return Ok(());
                };
                for (i, condition) in group.rest.iter().enumerate() {
                    let i = i + 1;
                    if self.condition_holds(condition, &format!("{path}.{key}[{i}]"), claims).is_ok() {
                        return Ok(());
                    }
                }
                Err(failure)
            }
        }
    }

    fn condition_holds(
        &self,
        condition: &Condition,
        path: &str,
        claims: &Map<String, Value>,
    ) -> Result<(), FailedClause> {
        match condition {
            Condition::Group(group) => self.group_holds(group, path, claims),
            Condition::Claim(c) => {
                let actual = self.lookup(claims, &c.claim);
                if c.test.holds(actual) {
                    return Ok(());
                }
                Err(FailedClause {
                    path: path.to_owned(),
                    claim: c.claim.clone(),
                    operator: c.test.operator(),
                    expected: c.test.operand().to_string(),
                    actual: actual.map(shown),
                })
            }
        }
    }

    fn lookup<'c>(&self, claims: &'c Map<String, Value>, name: &str) -> Option<&'c Value> {
        // The literal name first, in every version: a top-level claim whose
        // name contains dots must stay reachable.
        if let Some(value) = claims.get(name) {
            return Some(value);
        }
        if self.version == PolicyVersion::V1_0_0 {
            return None;
        }
        let mut segments = name.split('.');
        let mut current = claims.get(segments.next()?)?;
        for segment in segments {
            current = current.as_object()?.get(segment)?;
        }
        Some(current)
    }
}

fn group_json(group: &Group) -> Value {
    Value::Array(group.conditions().map(condition_json).collect())
}

fn condition_json(condition: &Condition) -> Value {
    let mut map = Map::new();
    match condition {
        Condition::Group(group) => {
            map.insert(group.combinator.key().to_owned(), group_json(group));
        }
        Condition::Claim(c) => {
            map.insert("claim".to_owned(), Value::String(c.claim.clone()));
            map.insert(c.test.operator().name().to_owned(), c.test.operand());
        }
    }
    Value::Object(map)
}

/// A value as JSON, cut to [`MAX_SHOWN_CHARS`] characters.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= MAX_SHOWN_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_SHOWN_CHARS).collect();
    cut.push('…');
    cut
}

/// Scheme, host (both lowercased) and path (exact, `None` when there is
/// none) of an authority or issuer, after removing one trailing `/`.
fn authority_parts(url: &str) -> Option<(String, String, Option<&str>)> {
    let url = url.strip_suffix('/').unwrap_or(url);
    let (scheme, rest) = url.split_once("://")?;
    let (host, path) = match rest.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (rest, None),
    };
    if scheme.is_empty() || host.is_empty() {
        return None;
    }
    Some((scheme.to_ascii_lowercase(), host.to_ascii_lowercase(), path))
}

fn authority_matches(authority: &str, issuer: &str) -> bool {
    match (authority_parts(authority), authority_parts(issuer)) {
        (Some(a), Some(i)) => a == i,
        _ => false,
    }
}

/// A JSON value that keeps every object entry in document order, duplicates
/// included: `serde_json::Value` silently keeps the last of two duplicate
/// keys, and a policy with `"equals"` twice must be refused, not half read.
enum Raw {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Raw>),
    Object(Vec<(String, Raw)>),
}

impl Raw {
    fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::String(_) => "a string",
            Self::Array(_) => "an array",
            Self::Object(_) => "an object",
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Number::from_f64(v).map(Raw::Number).ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Raw::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Raw>()? {
            entries.push(entry);
        }
        Ok(Raw::Object(entries))
    }
}

/// Counts conditions across the whole walk.
struct Parser {
    conditions: usize,
}

/// The JSON path of a list element under `parent`.
fn element_path(parent: &str, key: &str, index: usize) -> String {
    if parent.is_empty() { format!("{key}[{index}]") } else { format!("{parent}.{key}[{index}]") }
}

fn object<'r>(raw: &'r Raw, path: &str) -> Result<&'r [(String, Raw)], ReleasePolicyError> {
    match raw {
        Raw::Object(entries) => Ok(entries),
        other => {
            Err(ReleasePolicyError::WrongType { path: path.to_owned(), expected: "an object", found: other.kind() })
        }
    }
}

fn string<'r>(raw: &'r Raw, path: &str) -> Result<&'r str, ReleasePolicyError> {
    match raw {
        Raw::String(s) => Ok(s),
        other => {
            Err(ReleasePolicyError::WrongType { path: path.to_owned(), expected: "a string", found: other.kind() })
        }
    }
}

/// Sorts an object's entries into the `known` keys (matched
/// case-insensitively, as Azure does), refusing duplicates and, through
/// `unknown`, any other key.
fn pick<'r, const N: usize>(
    entries: &'r [(String, Raw)],
    path: &str,
    known: [&'static str; N],
    unknown: impl Fn(&str) -> ReleasePolicyError,
) -> Result<[Option<&'r Raw>; N], ReleasePolicyError> {
    let mut found: [Option<&Raw>; N] = [None; N];
    for (key, value) in entries {
        let Some((slot, name)) = found.iter_mut().zip(known).find(|(_, name)| name.eq_ignore_ascii_case(key)) else {
            return Err(unknown(key));
        };
        if slot.is_some() {
            return Err(ReleasePolicyError::DuplicateKey { path: path.to_owned(), key: name });
        }
        *slot = Some(value);
    }
    Ok(found)
}

/// Picks the one combinator of an object that must have exactly one.
fn one_combinator<'r>(
    all_of: Option<&'r Raw>,
    any_of: Option<&'r Raw>,
    path: &str,
) -> Result<(Combinator, &'r Raw), ReleasePolicyError> {
    match (all_of, any_of) {
        (Some(list), None) => Ok((Combinator::AllOf, list)),
        (None, Some(list)) => Ok((Combinator::AnyOf, list)),
        (Some(_), Some(_)) => {
            Err(ReleasePolicyError::ConflictingKeys { path: path.to_owned(), first: "allOf", second: "anyOf" })
        }
        (None, None) => Err(ReleasePolicyError::MissingKey { path: path.to_owned(), what: "\"allOf\" or \"anyOf\"" }),
    }
}

impl Parser {
    fn policy(&mut self, raw: &Raw) -> Result<ReleasePolicy, ReleasePolicyError> {
        let root = "policy";
        let entries = object(raw, root)?;
        let [version, any_of] = pick(entries, root, ["version", "anyOf"], |key| ReleasePolicyError::UnknownKey {
            path: root.to_owned(),
            key: key.to_owned(),
            expected: "\"version\" and \"anyOf\"",
        })?;
        let version = version.ok_or(ReleasePolicyError::MissingKey { path: root.to_owned(), what: "\"version\"" })?;
        let version = match string(version, "version")? {
            "1.0.0" => PolicyVersion::V1_0_0,
            "1.2.0" => PolicyVersion::V1_2_0,
            other => return Err(ReleasePolicyError::UnsupportedVersion { found: other.to_owned() }),
        };
        let any_of = any_of.ok_or(ReleasePolicyError::MissingKey { path: root.to_owned(), what: "\"anyOf\"" })?;
        let Raw::Array(list) = any_of else {
            return Err(ReleasePolicyError::WrongType {
                path: "anyOf".to_owned(),
                expected: "an array",
                found: any_of.kind(),
            });
        };
        if list.is_empty() {
            return Err(ReleasePolicyError::EmptyList { path: root.to_owned(), key: "anyOf" });
        }
        if list.len() > MAX_AUTHORITIES {
            return Err(ReleasePolicyError::TooManyAuthorities { limit: MAX_AUTHORITIES });
        }
        let authorities = list
            .iter()
            .enumerate()
            .map(|(i, raw)| self.authority(raw, &element_path("", "anyOf", i)))
            .collect::<Result<_, _>>()?;
        Ok(ReleasePolicy { version, authorities })
    }

    fn authority(&mut self, raw: &Raw, path: &str) -> Result<Authority, ReleasePolicyError> {
        let entries = object(raw, path)?;
        let [authority, all_of, any_of] =
            pick(entries, path, ["authority", "allOf", "anyOf"], |key| ReleasePolicyError::UnknownKey {
                path: path.to_owned(),
                key: key.to_owned(),
                expected: "\"authority\" and one of \"allOf\" or \"anyOf\"",
            })?;
        let authority =
            authority.ok_or(ReleasePolicyError::MissingKey { path: path.to_owned(), what: "\"authority\"" })?;
        let authority = string(authority, &format!("{path}.authority"))?;
        if authority.is_empty() {
            return Err(ReleasePolicyError::EmptyString { path: path.to_owned(), what: "\"authority\"" });
        }
        if authority_parts(authority).is_none() {
            return Err(ReleasePolicyError::BadAuthority { path: path.to_owned(), found: authority.to_owned() });
        }
        let (combinator, list) = one_combinator(all_of, any_of, path)?;
        let group = self.group(combinator, list, path, 1)?;
        Ok(Authority { authority: authority.to_owned(), group })
    }

    /// Parses the list under `combinator` of the object at `path`, which
    /// sits at nesting level `depth`.
    fn group(
        &mut self,
        combinator: Combinator,
        raw: &Raw,
        path: &str,
        depth: usize,
    ) -> Result<Group, ReleasePolicyError> {
        let key = combinator.key();
        if depth > MAX_DEPTH {
            return Err(ReleasePolicyError::TooDeep { path: path.to_owned(), limit: MAX_DEPTH });
        }
        let Raw::Array(list) = raw else {
            return Err(ReleasePolicyError::WrongType {
                path: format!("{path}.{key}"),
                expected: "an array",
                found: raw.kind(),
            });
        };
        let mut conditions =
            list.iter().enumerate().map(|(i, raw)| self.condition(raw, &element_path(path, key, i), depth));
        let first = conditions.next().ok_or(ReleasePolicyError::EmptyList { path: path.to_owned(), key })??;
        let rest = conditions.collect::<Result<_, _>>()?;
        Ok(Group { combinator, first: Box::new(first), rest })
    }

    fn condition(&mut self, raw: &Raw, path: &str, depth: usize) -> Result<Condition, ReleasePolicyError> {
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return Err(ReleasePolicyError::TooManyConditions { limit: MAX_CONDITIONS });
        }
        let entries = object(raw, path)?;
        let has = |name: &str| entries.iter().any(|(key, _)| key.eq_ignore_ascii_case(name));
        if has("claim") {
            return self.claim_condition(entries, path).map(Condition::Claim);
        }
        if has("allOf") || has("anyOf") {
            let [all_of, any_of] = pick(entries, path, ["allOf", "anyOf"], |key| ReleasePolicyError::UnknownKey {
                path: path.to_owned(),
                key: key.to_owned(),
                expected: "a single \"allOf\" or \"anyOf\"",
            })?;
            let (combinator, list) = one_combinator(all_of, any_of, path)?;
            return self.group(combinator, list, path, depth + 1).map(Condition::Group);
        }
        if Operator::ALL.iter().any(|op| has(op.name())) {
            return Err(ReleasePolicyError::MissingKey { path: path.to_owned(), what: "\"claim\"" });
        }
        match entries.first() {
            Some((key, _)) => Err(ReleasePolicyError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                expected: "\"claim\", \"allOf\" or \"anyOf\"",
            }),
            None => Err(ReleasePolicyError::MissingKey {
                path: path.to_owned(),
                what: "\"claim\" with an operator, \"allOf\" or \"anyOf\"",
            }),
        }
    }

    fn claim_condition(&mut self, entries: &[(String, Raw)], path: &str) -> Result<ClaimCondition, ReleasePolicyError> {
        let known = ["claim", "equals", "notEquals", "less", "lessOrEquals", "greater", "greaterOrEquals", "exists"];
        let [claim, operands @ ..] = pick(entries, path, known, |key| ReleasePolicyError::NotAnOperator {
            path: path.to_owned(),
            key: key.to_owned(),
        })?;
        let claim = claim.ok_or(ReleasePolicyError::MissingKey { path: path.to_owned(), what: "\"claim\"" })?;
        let claim = string(claim, &format!("{path}.claim"))?;
        if claim.is_empty() {
            return Err(ReleasePolicyError::EmptyString { path: path.to_owned(), what: "\"claim\"" });
        }
        let mut present = Operator::ALL.into_iter().zip(operands).filter_map(|(op, raw)| raw.map(|raw| (op, raw)));
        let (operator, operand) = present.next().ok_or(ReleasePolicyError::NoOperator { path: path.to_owned() })?;
        if let Some((second, _)) = present.next() {
            return Err(ReleasePolicyError::TwoOperators {
                path: path.to_owned(),
                first: operator.name(),
                second: second.name(),
            });
        }
        let test = test(operator, operand, path)?;
        Ok(ClaimCondition { claim: claim.to_owned(), test })
    }
}

fn test(operator: Operator, operand: &Raw, path: &str) -> Result<Test, ReleasePolicyError> {
    let bad = |expected| ReleasePolicyError::BadOperand {
        path: path.to_owned(),
        operator: operator.name(),
        expected,
        found: operand.kind(),
    };
    let scalar = || match operand {
        Raw::String(s) => Ok(Scalar::String(s.clone())),
        Raw::Number(n) => Ok(Scalar::Number(n.clone())),
        Raw::Bool(b) => Ok(Scalar::Bool(*b)),
        _ => Err(bad("a string, number or boolean")),
    };
    let number = || match operand {
        Raw::Number(n) => Ok(n.clone()),
        _ => Err(bad("a number")),
    };
    Ok(match operator {
        Operator::Equals => Test::Equals(scalar()?),
        Operator::NotEquals => Test::NotEquals(scalar()?),
        Operator::Less => Test::Less(number()?),
        Operator::LessOrEquals => Test::LessOrEquals(number()?),
        Operator::Greater => Test::Greater(number()?),
        Operator::GreaterOrEquals => Test::GreaterOrEquals(number()?),
        Operator::Exists => match operand {
            Raw::Bool(b) => Test::Exists(*b),
            _ => return Err(bad("true or false")),
        },
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const AZURE_CC: &str = r#"{"version":"1.0.0","anyOf":[
 {"authority":"https://sharedeus.eus.attest.azure.net","allOf":[
 {"claim":"x-ms-attestation-type","equals":"sevsnpvm"},
 {"claim":"x-ms-sevsnpvm-hostdata","equals":"73973b78d70cc68353426de188db5dfc57e5b766e399935fb73a61127ea26d20"},
 {"claim":"x-ms-sevsnpvm-is-debuggable","equals":false}]}]}"#;
    const MAA: &str = "https://sharedeus.eus.attest.azure.net";
    const T: &str = "https://trust.example";

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("claims must be an object"),
        }
    }

    fn azure_claims() -> Map<String, Value> {
        claims(json!({
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-sevsnpvm-hostdata": "73973b78d70cc68353426de188db5dfc57e5b766e399935fb73a61127ea26d20",
            "x-ms-sevsnpvm-is-debuggable": false,
            "x-ms-ver": "1.0",
        }))
    }

    fn policy(json: Value) -> ReleasePolicy {
        ReleasePolicy::parse(json.to_string().as_bytes()).unwrap()
    }

    /// A one-authority 1.0.0 policy over `conditions` (an allOf).
    fn simple(conditions: Value) -> ReleasePolicy {
        policy(json!({"version": "1.0.0", "anyOf": [{"authority": T, "allOf": conditions}]}))
    }

    fn holds(p: &ReleasePolicy, c: Value) -> bool {
        p.evaluate(T, &claims(c)).is_ok()
    }

    /// A 1.0.0 policy document with one authority whose allOf holds `conditions`.
    fn in_all_of(conditions: &str) -> String {
        format!(r#"{{"version":"1.0.0","anyOf":[{{"authority":"https://a","allOf":[{conditions}]}}]}}"#)
    }

    fn parse_err(json: &str) -> String {
        ReleasePolicy::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn azure_confidential_container_policy_releases_on_matching_claims() {
        let p = ReleasePolicy::parse(AZURE_CC.as_bytes()).unwrap();
        assert_eq!(p.version(), PolicyVersion::V1_0_0);
        assert_eq!(p.authorities().collect::<Vec<_>>(), [MAA]);
        let release = p.evaluate(MAA, &azure_claims()).unwrap();
        assert_eq!(release, Release { authority_index: 0, authority: MAA.to_owned() });
    }

    #[test]
    fn azure_policy_denies_a_debuggable_guest_and_says_why() {
        let p = ReleasePolicy::parse(AZURE_CC.as_bytes()).unwrap();
        let mut c = azure_claims();
        c.insert("x-ms-sevsnpvm-is-debuggable".into(), Value::Bool(true));
        let denial = p.evaluate(MAA, &c).unwrap_err();
        let [only] = denial.authorities.as_slice() else { panic!("one authority") };
        assert_eq!(
            only.reason,
            DenialReason::Clause(FailedClause {
                path: "anyOf[0].allOf[2]".into(),
                claim: "x-ms-sevsnpvm-is-debuggable".into(),
                operator: Operator::Equals,
                expected: "false".into(),
                actual: Some("true".into()),
            })
        );
        assert_eq!(
            denial.to_string(),
            "authority[0] \"https://sharedeus.eus.attest.azure.net\": anyOf[0].allOf[2]: \
             claim \"x-ms-sevsnpvm-is-debuggable\" equals false does not hold: token has true"
        );
    }

    #[test]
    fn absent_claim_is_reported_as_absent() {
        let p = ReleasePolicy::parse(AZURE_CC.as_bytes()).unwrap();
        let mut c = azure_claims();
        c.remove("x-ms-sevsnpvm-hostdata");
        let text = p.evaluate(MAA, &c).unwrap_err().to_string();
        assert!(text.contains("anyOf[0].allOf[1]: claim \"x-ms-sevsnpvm-hostdata\" equals \"7397"), "{text}");
        assert!(text.ends_with("claim absent from token"), "{text}");
    }

    #[test]
    fn equals_compares_typed_values() {
        let s = simple(json!([{"claim": "a", "equals": "x"}]));
        assert!(holds(&s, json!({"a": "x"})));
        assert!(!holds(&s, json!({"a": "X"})));
        assert!(!holds(&s, json!({"a": ["x"]})));
        assert!(!holds(&s, json!({"b": "x"})));

        let n = simple(json!([{"claim": "a", "equals": 2}]));
        assert!(holds(&n, json!({"a": 2})));
        assert!(holds(&n, json!({"a": 2.0})));
        assert!(!holds(&n, json!({"a": "2"})));
        assert!(!holds(&n, json!({"a": 3})));

        let b = simple(json!([{"claim": "a", "equals": true}]));
        assert!(holds(&b, json!({"a": true})));
        assert!(!holds(&b, json!({"a": false})));
        assert!(!holds(&b, json!({"a": "true"})), "a boolean operand only matches a boolean claim");
        assert!(!holds(&b, json!({"a": 1})));

        // The one cross-type rule: quoted booleans in the policy.
        let quoted = simple(json!([{"claim": "a", "equals": "false"}]));
        assert!(holds(&quoted, json!({"a": false})));
        assert!(holds(&quoted, json!({"a": "false"})));
        assert!(!holds(&quoted, json!({"a": true})));
        let upper = simple(json!([{"claim": "a", "equals": "False"}]));
        assert!(!holds(&upper, json!({"a": false})));
    }

    #[test]
    fn big_integers_compare_exactly() {
        let p = simple(json!([{"claim": "a", "equals": 9_007_199_254_740_993_u64}]));
        assert!(holds(&p, json!({"a": 9_007_199_254_740_993_u64})));
        assert!(!holds(&p, json!({"a": 9_007_199_254_740_992_u64})));
        let neg = simple(json!([{"claim": "a", "less": -1}]));
        assert!(holds(&neg, json!({"a": -2})));
        assert!(!holds(&neg, json!({"a": u64::MAX})));
    }

    #[test]
    fn not_equals_fails_closed() {
        let p = simple(json!([{"claim": "a", "notEquals": "x"}]));
        assert!(holds(&p, json!({"a": "y"})));
        assert!(!holds(&p, json!({"a": "x"})));
        assert!(!holds(&p, json!({})), "absent claim");
        assert!(!holds(&p, json!({"a": 5})), "type mismatch");
        assert!(!holds(&p, json!({"a": null})));
        let b = simple(json!([{"claim": "a", "notEquals": "true"}]));
        assert!(holds(&b, json!({"a": false})));
        assert!(!holds(&b, json!({"a": true})));
    }

    #[test]
    fn ordering_operators() {
        let cases = [
            ("less", [true, false, false]),
            ("lessOrEquals", [true, true, false]),
            ("greater", [false, false, true]),
            ("greaterOrEquals", [false, true, true]),
        ];
        for (op, expect) in cases {
            let p = simple(json!([{"claim": "svn", op: 5}]));
            for (value, want) in [4, 5, 6].into_iter().zip(expect) {
                assert_eq!(holds(&p, json!({ "svn": value })), want, "{op} 5 with {value}");
            }
            assert_eq!(holds(&p, json!({"svn": 4.5})), expect[0], "{op} with a fraction");
            assert!(!holds(&p, json!({"svn": "4"})), "{op}: a string claim never compares");
            assert!(!holds(&p, json!({"svn": true})), "{op}: a boolean claim never compares");
            assert!(!holds(&p, json!({})), "{op}: absent");
        }
        let f = simple(json!([{"claim": "x", "greaterOrEquals": 1.5}]));
        assert!(holds(&f, json!({"x": 2})));
        assert!(!holds(&f, json!({"x": 1})));
    }

    #[test]
    fn exists_operator() {
        let yes = simple(json!([{"claim": "a", "exists": true}]));
        assert!(holds(&yes, json!({"a": "anything"})));
        assert!(holds(&yes, json!({"a": null})));
        assert!(!holds(&yes, json!({"b": 1})));
        let no = simple(json!([{"claim": "a", "exists": false}]));
        assert!(holds(&no, json!({"b": 1})));
        assert!(!holds(&no, json!({"a": false})));
    }

    #[test]
    fn nested_groups() {
        let p = simple(json!([
            {"claim": "type", "equals": "sevsnpvm"},
            {"anyOf": [
                {"claim": "measurement", "equals": "aa"},
                {"allOf": [
                    {"claim": "measurement", "equals": "bb"},
                    {"claim": "svn", "greaterOrEquals": 3},
                ]},
            ]},
        ]));
        assert!(holds(&p, json!({"type": "sevsnpvm", "measurement": "aa"})));
        assert!(holds(&p, json!({"type": "sevsnpvm", "measurement": "bb", "svn": 3})));
        assert!(!holds(&p, json!({"type": "sevsnpvm", "measurement": "bb", "svn": 2})));
        assert!(!holds(&p, json!({"type": "tdxvm", "measurement": "aa"})));
        let denial = p.evaluate(T, &claims(json!({"type": "sevsnpvm", "measurement": "cc"}))).unwrap_err();
        // Under anyOf, the first alternative's failure is reported.
        let DenialReason::Clause(clause) = &denial.authorities[0].reason else { panic!("clause") };
        assert_eq!(clause.path, "anyOf[0].allOf[1].anyOf[0]");
        assert_eq!(clause.actual.as_deref(), Some("\"cc\""));
    }

    #[test]
    fn authority_level_any_of() {
        let p = policy(json!({"version": "1.0.0", "anyOf": [{"authority": T, "anyOf": [
            {"claim": "a", "equals": 1}, {"claim": "b", "equals": 2}]}]}));
        assert!(holds(&p, json!({"b": 2})));
        assert!(!holds(&p, json!({"a": 2, "b": 1})));
    }

    #[test]
    fn second_authority_releases_and_denial_has_a_line_per_authority() {
        let p = policy(json!({"version": "1.0.0", "anyOf": [
            {"authority": MAA, "allOf": [{"claim": "a", "equals": 1}]},
            {"authority": T, "allOf": [{"claim": "a", "equals": 1}]},
        ]}));
        assert_eq!(p.evaluate(T, &claims(json!({"a": 1}))).unwrap().authority_index, 1);
        let denial = p.evaluate(T, &claims(json!({"a": 2}))).unwrap_err();
        let text = denial.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], format!("authority[0] \"{MAA}\": token issuer \"https://trust.example\" does not match"));
        assert_eq!(
            lines[1],
            format!("authority[1] \"{T}\": anyOf[1].allOf[0]: claim \"a\" equals 1 does not hold: token has 2")
        );
    }

    #[test]
    fn authority_matching() {
        let p = simple(json!([{"claim": "a", "exists": true}]));
        let c = claims(json!({"a": 1}));
        for ok in ["https://trust.example", "https://trust.example/", "HTTPS://Trust.Example", "https://TRUST.example/"]
        {
            assert!(p.evaluate(ok, &c).is_ok(), "{ok}");
        }
        for bad in [
            "https://trust.example/sim",
            "https://trust.example//",
            "http://trust.example",
            "https://trust.example.evil",
            "https://trust.example:443",
            "trust.example",
            "",
        ] {
            assert!(p.evaluate(bad, &c).is_err(), "{bad}");
        }
        let with_path = policy(json!({"version": "1.0.0", "anyOf": [
            {"authority": "https://Trust.example/Sim/", "allOf": [{"claim": "a", "exists": true}]},
        ]}));
        assert!(with_path.evaluate("https://trust.example/Sim", &c).is_ok());
        assert!(with_path.evaluate("https://trust.example/sim", &c).is_err(), "path is case-sensitive");
        assert!(with_path.evaluate("https://trust.example", &c).is_err());
    }

    #[test]
    fn dotted_claims_descend_only_in_1_2_0() {
        let conditions = json!([{"claim": "x-ms-runtime.client-payload.nonce", "equals": "abc"}]);
        let token = json!({"x-ms-runtime": {"client-payload": {"nonce": "abc"}}});
        let v1 = policy(json!({"version": "1.0.0", "anyOf": [{"authority": T, "allOf": conditions}]}));
        let v12 = policy(json!({"version": "1.2.0", "anyOf": [{"authority": T, "allOf": conditions}]}));
        assert!(!holds(&v1, token.clone()));
        assert!(holds(&v12, token));
        // A literal dotted top-level claim wins over the nested path, in both versions.
        let both =
            json!({"x-ms-runtime.client-payload.nonce": "abc", "x-ms-runtime": {"client-payload": {"nonce": "zzz"}}});
        assert!(holds(&v1, both.clone()));
        assert!(holds(&v12, both));
        // Descending through a non-object fails closed.
        assert!(!holds(&v12, json!({"x-ms-runtime": "client-payload"})));
        assert!(!holds(&v12, json!({"x-ms-runtime": {"client-payload": ["nonce"]}})));
    }

    #[test]
    fn case_insensitive_keys_and_canonical_round_trip() {
        let loose = r#"{"Version":"1.2.0","anyof":[{"AUTHORITY":"https://a.example","AllOf":[
            {"Claim":"a","EQUALS":"x"},{"ANYOF":[{"claim":"b","LessOrEquals":2.5},{"claim":"c","exists":false}]},
            {"claim":"d","notequals":false},{"claim":"e","greaterorequals":-3}]}]}"#;
        let p = ReleasePolicy::parse(loose.as_bytes()).unwrap();
        let canonical = p.to_json();
        assert_eq!(
            canonical,
            json!({"version": "1.2.0", "anyOf": [{"authority": "https://a.example", "allOf": [
                {"claim": "a", "equals": "x"},
                {"anyOf": [{"claim": "b", "lessOrEquals": 2.5}, {"claim": "c", "exists": false}]},
                {"claim": "d", "notEquals": false},
                {"claim": "e", "greaterOrEquals": -3},
            ]}]})
        );
        assert_eq!(ReleasePolicy::parse(canonical.to_string().as_bytes()).unwrap(), p);
        let azure = ReleasePolicy::parse(AZURE_CC.as_bytes()).unwrap();
        assert_eq!(ReleasePolicy::parse(azure.to_json().to_string().as_bytes()).unwrap(), azure);
    }

    #[test]
    fn canonical_round_trip_keeps_every_float_bit() {
        // Found by fuzz/release_policy: without serde_json's correctly
        // rounded float parsing, the canonical `4.111111e+44` read back one
        // ulp below the value this integer literal parsed to.
        let p = ReleasePolicy::parse(
            in_all_of(r#"{"claim":"n","greaterOrEquals":411111100000000000000000002202393686278988686}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(ReleasePolicy::parse(p.to_json().to_string().as_bytes()).unwrap(), p);
    }

    #[test]
    fn parse_error_unknown_key() {
        assert_eq!(
            parse_err(r#"{"version":"1.0.0","anyOf":[],"extra":1}"#),
            "policy: unknown key \"extra\" (expected \"version\" and \"anyOf\")"
        );
        assert_eq!(
            parse_err(&in_all_of(r#"{"any":[]}"#)),
            "anyOf[0].allOf[0]: unknown key \"any\" (expected \"claim\", \"allOf\" or \"anyOf\")"
        );
        assert_eq!(
            parse_err(
                r#"{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"a","exists":true}],"x":1}]}"#
            ),
            "anyOf[0]: unknown key \"x\" (expected \"authority\" and one of \"allOf\" or \"anyOf\")"
        );
    }

    #[test]
    fn parse_error_not_an_operator() {
        assert_eq!(
            parse_err(
                r#"{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[
                {"claim":"a","exists":true},{"claim":"b","exists":true},{"claim":"c","equal":"x"}]}]}"#
            ),
            "anyOf[0].allOf[2]: \"equal\" is not an operator (expected one of equals, notEquals, less, \
             lessOrEquals, greater, greaterOrEquals, exists)"
        );
    }

    #[test]
    fn parse_error_two_operators_and_duplicates() {
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a","equals":"x","exists":true}"#)),
            "anyOf[0].allOf[0]: claim condition has two operators, \"equals\" and \"exists\"; keep exactly one"
        );
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a","equals":"x","Equals":"y"}"#)),
            "anyOf[0].allOf[0]: key \"equals\" appears more than once (keys are case-insensitive); keep one"
        );
        assert_eq!(
            parse_err(r#"{"version":"1.0.0","version":"1.0.0","anyOf":[]}"#),
            "policy: key \"version\" appears more than once (keys are case-insensitive); keep one"
        );
        assert_eq!(
            parse_err(
                r#"{"version":"1.0.0","anyOf":[{"authority":"https://a",
                "allOf":[{"claim":"a","exists":true}],"anyOf":[{"claim":"a","exists":true}]}]}"#
            ),
            "anyOf[0]: \"allOf\" and \"anyOf\" cannot both appear; keep one"
        );
    }

    #[test]
    fn parse_error_no_operator_and_missing_keys() {
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a"}"#)),
            "anyOf[0].allOf[0]: claim condition has no operator; add one of equals, notEquals, less, \
             lessOrEquals, greater, greaterOrEquals, exists"
        );
        assert_eq!(parse_err(&in_all_of(r#"{"equals":"a"}"#)), "anyOf[0].allOf[0]: missing \"claim\"");
        assert_eq!(parse_err(r#"{"anyOf":[]}"#), "policy: missing \"version\"");
        assert_eq!(parse_err(r#"{"version":"1.0.0"}"#), "policy: missing \"anyOf\"");
        assert_eq!(
            parse_err(r#"{"version":"1.0.0","anyOf":[{"allOf":[{"claim":"a","exists":true}]}]}"#),
            "anyOf[0]: missing \"authority\""
        );
        assert_eq!(
            parse_err(r#"{"version":"1.0.0","anyOf":[{"authority":"https://a"}]}"#),
            "anyOf[0]: missing \"allOf\" or \"anyOf\""
        );
    }

    #[test]
    fn parse_error_empty_lists() {
        assert_eq!(
            parse_err(r#"{"version":"1.0.0","anyOf":[]}"#),
            "policy: \"anyOf\" is empty; list at least one entry"
        );
        assert_eq!(parse_err(&in_all_of("")), "anyOf[0]: \"allOf\" is empty; list at least one entry");
        assert_eq!(
            parse_err(&in_all_of(r#"{"anyOf":[]}"#)),
            "anyOf[0].allOf[0]: \"anyOf\" is empty; list at least one entry"
        );
    }

    #[test]
    fn parse_error_bad_version() {
        assert_eq!(
            parse_err(r#"{"version":"1.1.0","anyOf":[]}"#),
            "version: \"1.1.0\" is not supported (expected \"1.0.0\" or \"1.2.0\")"
        );
        assert_eq!(parse_err(r#"{"version":1,"anyOf":[]}"#), "version: expected a string, found a number");
    }

    #[test]
    fn parse_error_operand_types() {
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a","less":"5"}"#)),
            "anyOf[0].allOf[0]: \"less\" needs a number, found a string"
        );
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a","exists":"true"}"#)),
            "anyOf[0].allOf[0]: \"exists\" needs true or false, found a string"
        );
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a","equals":null}"#)),
            "anyOf[0].allOf[0]: \"equals\" needs a string, number or boolean, found null"
        );
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":"a","notEquals":["x"]}"#)),
            "anyOf[0].allOf[0]: \"notEquals\" needs a string, number or boolean, found an array"
        );
        assert_eq!(
            parse_err(&in_all_of(r#"{"claim":7,"equals":"x"}"#)),
            "anyOf[0].allOf[0].claim: expected a string, found a number"
        );
        assert_eq!(parse_err(&in_all_of(r#"{"claim":"","equals":"x"}"#)), "anyOf[0].allOf[0]: \"claim\" is empty");
        assert_eq!(
            parse_err(r#"{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":{"claim":"a","equals":"x"}}]}"#),
            "anyOf[0].allOf: expected an array, found an object"
        );
    }

    #[test]
    fn parse_error_bad_authority() {
        assert_eq!(
            parse_err(
                r#"{"version":"1.0.0","anyOf":[{"authority":"trust.example","allOf":[{"claim":"a","exists":true}]}]}"#
            ),
            "anyOf[0]: authority \"trust.example\" is not of the form scheme://host[/path]"
        );
    }

    fn nested(levels: usize) -> String {
        let mut condition = json!({"claim": "a", "exists": true});
        for _ in 0..levels {
            condition = json!({"anyOf": [condition]});
        }
        json!({"version": "1.0.0", "anyOf": [{"authority": T, "allOf": [condition]}]}).to_string()
    }

    #[test]
    fn parse_error_depth() {
        // The authority's list is level 1, so 15 nested groups reach the limit.
        let deepest = ReleasePolicy::parse(nested(MAX_DEPTH - 1).as_bytes()).unwrap();
        assert!(deepest.evaluate(T, &claims(json!({"a": 1}))).is_ok());
        let message = parse_err(&nested(MAX_DEPTH));
        let path = format!("anyOf[0].allOf[0]{}", ".anyOf[0]".repeat(MAX_DEPTH - 1));
        assert_eq!(message, format!("{path}: conditions nest deeper than 16 levels; flatten the policy"));
        // Far deeper than the limit is refused by the JSON parser's own bound, still without a panic.
        assert!(ReleasePolicy::parse(nested(500).as_bytes()).is_err());
    }

    #[test]
    fn parse_error_size_limits() {
        let many: Vec<Value> =
            (0..=MAX_CONDITIONS).map(|i| json!({"claim": format!("c{i}"), "exists": false})).collect();
        let doc = json!({"version": "1.0.0", "anyOf": [{"authority": T, "allOf": many}]}).to_string();
        assert_eq!(parse_err(&doc), "policy has more than 1024 conditions; simplify it");
        let authorities: Vec<Value> =
            (0..=MAX_AUTHORITIES).map(|_| json!({"authority": T, "allOf": [{"claim": "a", "exists": true}]})).collect();
        let doc = json!({"version": "1.0.0", "anyOf": authorities}).to_string();
        assert_eq!(parse_err(&doc), "anyOf: policy lists more than 64 authorities; simplify it");
    }

    #[test]
    fn parse_error_not_json() {
        assert!(parse_err("{").starts_with("release policy is not valid JSON ("));
        assert!(parse_err(&format!("{AZURE_CC} x")).starts_with("release policy is not valid JSON ("));
        assert_eq!(parse_err("[]"), "policy: expected an object, found an array");
    }

    #[test]
    fn denial_truncates_long_values() {
        let p = simple(json!([{"claim": "a", "equals": "x"}]));
        let long = "é".repeat(1000);
        let denial = p.evaluate(T, &claims(json!({"a": long}))).unwrap_err();
        let DenialReason::Clause(clause) = &denial.authorities[0].reason else { panic!("clause") };
        let actual = clause.actual.as_deref().unwrap();
        assert_eq!(actual.chars().count(), MAX_SHOWN_CHARS + 1);
        assert!(actual.ends_with('…'));
        let issuer = format!("https://{}", "a".repeat(1000));
        let denial = p.evaluate(&issuer, &claims(json!({"a": "x"}))).unwrap_err();
        assert!(denial.to_string().len() < 400);
    }

    #[test]
    fn no_panic_on_any_prefix_or_byte_flip() {
        let bytes = AZURE_CC.as_bytes();
        for end in 0..bytes.len() {
            let _ = ReleasePolicy::parse(&bytes[..end]);
        }
        for i in 0..bytes.len() {
            for b in [b'{', b'}', b'[', b']', b'"', b',', b':', b'0', b'x', 0xff] {
                let mut mutated = bytes.to_vec();
                mutated[i] = b;
                if let Ok(p) = ReleasePolicy::parse(&mutated) {
                    let _ = p.evaluate(MAA, &azure_claims()).map_err(|d| d.to_string());
                    assert_eq!(ReleasePolicy::parse(p.to_json().to_string().as_bytes()).unwrap(), p);
                }
            }
        }
    }
}
