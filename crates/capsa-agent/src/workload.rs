//! The workload API: the Azure secure-key-release sidecar's REST API, served
//! by the agent on the guest's 127.0.0.1 so that existing workloads get
//! evidence, tokens and keys unchanged.
//!
//! Containers share the guest's network namespace, so a listener on the
//! guest's loopback ([`bind_loopback`], after [`crate::net::loopback_up`])
//! is reachable by the pod's containers and by nothing else: the host has no
//! network path into the guest. That is the API's only authentication, as it
//! is the sidecar's; what each endpoint may do is the execution policy's
//! decision, asked through [`WorkloadBackend::allowed`] before anything else.
//!
//! This module owns the HTTP side only: a small threaded HTTP/1.1 server
//! (one request per connection, bodies by `Content-Length` up to
//! [`MAX_BODY`], the whole request within [`READ_TIMEOUT`] so that a client
//! trickling bytes cannot hold a thread, at most [`MAX_CONNECTIONS`] at once
//! with the rest waiting in the listen backlog)
//! and the translation between JSON and [`WorkloadBackend`] calls. The
//! decisions and the attestation and key-release work live in the backend.
//!
//! | endpoint | request body | answer |
//! |---|---|---|
//! | `GET /status` | | `{"message": "STATUS OK"}` |
//! | `POST /attest/raw` | `{"runtime_data": base64}` | `{"report": hex of the evidence}` |
//! | `POST /attest/maa` | `{"maa_endpoint", "runtime_data": base64}` | `{"token": jwt}` |
//! | `POST /key/release` | `{"maa_endpoint", "akv_endpoint", "kid"}` | `{"key": the JWK as a JSON string}` |
//!
//! `key` is the JWK serialized to a string, not a nested object, because
//! that is what the Azure sidecar answers and what its clients parse.
//! Failures answer `{"error": "<step>: <message>"}` with 400 (malformed
//! request), 403 (refused by the execution policy or by a release policy),
//! 404, 405, 408, 413, 431 or 500. Bodies are never logged: one line per request
//! names its method, path and status.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde::de::IgnoredAny;
use zeroize::Zeroizing;

/// The port the Azure sidecar listens on, and so the one workloads expect.
pub const DEFAULT_PORT: u16 = 8080;
/// The largest request body accepted; the API's requests are a few hundred
/// bytes.
pub const MAX_BODY: usize = 64 << 10;
/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// How long a client has to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections are served at once; each has a thread in PID 1,
/// and further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client has to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many request headers are parsed.
const MAX_HEADERS: usize = 32;

/// The endpoints' names, as [`WorkloadBackend::allowed`] receives them.
pub mod endpoint {
    /// `GET /status`.
    pub const STATUS: &str = "status";
    /// `POST /attest/raw`.
    pub const ATTEST_RAW: &str = "attest/raw";
    /// `POST /attest/maa`.
    pub const ATTEST_MAA: &str = "attest/maa";
    /// `POST /key/release`.
    pub const KEY_RELEASE: &str = "key/release";
}

/// What the API asks of the rest of the agent. Implementations decide; the
/// server only translates.
pub trait WorkloadBackend: Send + Sync + 'static {
    /// The execution policy's decision for a workload API endpoint (one of
    /// [`endpoint`]'s names); `Err` carries the explanation, answered
    /// with 403.
    fn allowed(&self, endpoint: &str) -> Result<(), String>;

    /// Evidence whose report data binds `runtime_data`, as raw bytes.
    fn attest_raw(&self, runtime_data: &[u8]) -> Result<Vec<u8>, ApiError>;

    /// A token from the attestation service at `maa_endpoint` whose runtime
    /// claims bind `runtime_data`.
    fn attest_maa(&self, maa_endpoint: &str, runtime_data: &[u8]) -> Result<String, ApiError>;

    /// The key `kid` released by the key broker at `akv_endpoint` against a
    /// token from `maa_endpoint`, unwrapped inside the guest.
    fn release_key(&self, maa_endpoint: &str, akv_endpoint: &str, kid: &str) -> Result<Jwk, ApiError>;
}

/// The step of a request that failed, the prefix of its error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// The request itself: its HTTP framing, JSON, fields or encodings.
    Request,
    /// The execution policy refused the endpoint.
    ExecutionPolicy,
    /// Obtaining evidence.
    Attestation,
    /// Obtaining a token from the attestation service.
    Token,
    /// The key's release policy refused the token.
    ReleasePolicy,
    /// Unwrapping the released key inside the guest.
    Unwrap,
    /// A fault of the agent, not of the request.
    Internal,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Request => "request",
            Self::ExecutionPolicy => "execution policy",
            Self::Attestation => "attestation",
            Self::Token => "token",
            Self::ReleasePolicy => "release policy",
            Self::Unwrap => "unwrap",
            Self::Internal => "internal",
        })
    }
}

/// A failed request: the HTTP status to answer, the step that failed, and
/// what failed. The message is sent to the workload and logged nowhere; it
/// must never hold key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status: 4xx for the request or a refusal, 5xx for a fault.
    /// Anything outside 400..=599 is answered as 500.
    pub status: u16,
    /// The step that failed.
    pub step: Step,
    /// What failed, for the workload's operator.
    pub message: String,
}

impl ApiError {
    /// An error with the given status, step and message.
    pub fn new(status: u16, step: Step, message: impl Into<String>) -> Self {
        Self { status, step, message: message.into() }
    }

    /// A malformed request (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, Step::Request, message)
    }

    /// A refusal (403) at `step`.
    pub fn forbidden(step: Step, message: impl Into<String>) -> Self {
        Self::new(403, step, message)
    }

    /// A failure (500) at `step`.
    pub fn failed(step: Step, message: impl Into<String>) -> Self {
        Self::new(500, step, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A released key as a JSON Web Key (RFC 7517), holding secret material.
///
/// The JSON is kept as a string that is zeroized on drop, and is written
/// only into the `/key/release` answer; `Debug` shows `kty` and `kid`
/// alone, and there is neither `Clone` nor `Serialize`.
pub struct Jwk {
    json: Zeroizing<String>,
    kty: String,
    kid: Option<String>,
}

/// The members of a JWK that are not secret; everything else is skipped
/// without being copied.
#[derive(Deserialize)]
struct JwkHead<'a> {
    #[serde(borrow)]
    kty: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
}

impl Jwk {
    /// Takes a JWK in JSON: an object with a string `kty` and, optionally,
    /// a string `kid`.
    ///
    /// # Errors
    /// An [`ApiError`] at [`Step::Unwrap`] (500) when `json` is not such an
    /// object. The message quotes none of it.
    pub fn from_json(json: Zeroizing<String>) -> Result<Self, ApiError> {
        let head: JwkHead<'_> = serde_json::from_str(&json).map_err(|e| {
            // serde_json's message names a line and column, never the input.
            ApiError::failed(Step::Unwrap, format!("the released key is not a json web key with a kty: {e}"))
        })?;
        let (kty, kid) = (head.kty.into_owned(), head.kid.map(Cow::into_owned));
        Ok(Self { json, kty, kid })
    }

    /// A symmetric key as an `oct` JWK: `{"kty": "oct", "kid": kid, "k":
    /// base64url(key)}`.
    pub fn oct(kid: Option<&str>, key: &[u8]) -> Self {
        let kid_json = kid.map(|k| serde_json::Value::from(k).to_string());
        // Sized up front so that the string never reallocates and leaves a
        // copy of the key behind.
        let mut json =
            Zeroizing::new(String::with_capacity(key.len() * 2 + kid_json.as_ref().map_or(0, String::len) + 32));
        json.push_str(r#"{"kty":"oct","#);
        if let Some(kid) = &kid_json {
            json.push_str(r#""kid":"#);
            json.push_str(kid);
            json.push(',');
        }
        json.push_str(r#""k":""#);
        URL_SAFE_NO_PAD.encode_string(key, &mut json);
        json.push_str(r#""}"#);
        Self { json, kty: "oct".to_owned(), kid: kid.map(str::to_owned) }
    }

    /// The key type, such as `oct`, `RSA` or `EC`.
    pub fn kty(&self) -> &str {
        &self.kty
    }

    /// The key identifier, if the JWK has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The `/key/release` answer: `{"key": "<the JWK's JSON>"}`.
    fn response_body(&self) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        #[derive(serde::Serialize)]
        struct KeyAnswer<'a> {
            key: &'a str,
        }
        // Escaping at most doubles a JSON text (a quote or a newline becomes
        // two bytes); sized up front so that no reallocation leaves a copy.
        let mut body = Zeroizing::new(Vec::with_capacity(self.json.len() * 2 + 16));
        serde_json::to_writer(&mut *body, &KeyAnswer { key: &self.json })
            .map_err(|e| ApiError::failed(Step::Internal, format!("cannot encode the key answer: {e}")))?;
        Ok(body)
    }
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwk").field("kty", &self.kty).field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// Binds the workload API's listener on the guest's 127.0.0.1 and nowhere
/// else.
///
/// # Errors
/// The port cannot be bound (for instance `lo` is down, or it is in use).
pub fn bind_loopback(port: u16) -> io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
}

/// Serves the workload API on `listener` from a thread of its own, with a
/// thread per connection. Returns the accepting thread, which runs until
/// the listener fails.
///
/// # Errors
/// The accepting thread cannot be started.
pub fn serve(listener: TcpListener, backend: Arc<dyn WorkloadBackend>) -> io::Result<JoinHandle<()>> {
    serve_with(listener, backend, Limits::default())
}

/// The server's limits, fixed in production and shortened by tests.
#[derive(Debug, Clone, Copy)]
struct Limits {
    read_timeout: Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { read_timeout: READ_TIMEOUT, max_connections: MAX_CONNECTIONS }
    }
}

fn serve_with(listener: TcpListener, backend: Arc<dyn WorkloadBackend>, limits: Limits) -> io::Result<JoinHandle<()>> {
    let slots = Arc::new(Slots { active: Mutex::new(0), freed: Condvar::new(), max: limits.max_connections });
    thread::Builder::new().name("workload-api".into()).spawn(move || {
        loop {
            // At the limit, the next connection waits in the listen backlog;
            // every connection ends within the read and write timeouts.
            let slot = slots.take();
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("capsa-agent: workload api: accept failed: {e}");
                    // Out of descriptors or memory: give the connections
                    // in flight a moment to finish instead of spinning.
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let backend = Arc::clone(&backend);
            let spawned = thread::Builder::new().name("workload-conn".into()).spawn(move || {
                let _slot = slot;
                serve_connection(stream, backend.as_ref(), limits.read_timeout);
            });
            if let Err(e) = spawned {
                eprintln!("capsa-agent: workload api: cannot start a connection thread: {e}");
            }
        }
    })
}

/// A counting semaphore over the connections served at once.
struct Slots {
    active: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Slots {
    /// Waits for a free place.
    fn take(self: &Arc<Self>) -> Slot {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        while *active >= self.max {
            active = self.freed.wait(active).unwrap_or_else(PoisonError::into_inner);
        }
        *active += 1;
        Slot(Arc::clone(self))
    }
}

/// A place among the connections served at once, given back on drop.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut active = self.0.active.lock().unwrap_or_else(PoisonError::into_inner);
        *active = active.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// An HTTP answer: status, JSON body, and the `Allow` header for 405.
struct Answer {
    status: u16,
    body: Zeroizing<Vec<u8>>,
    allow: Option<&'static str>,
}

impl Answer {
    fn json(status: u16, value: &serde_json::Value) -> Self {
        Self { status, body: Zeroizing::new(value.to_string().into_bytes()), allow: None }
    }

    /// The one place errors become HTTP answers.
    fn error(e: &ApiError) -> Self {
        let status = if (400..=599).contains(&e.status) { e.status } else { 500 };
        Self::json(status, &serde_json::json!({ "error": e.to_string() }))
    }
}

/// A request as read off the connection.
struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Why no request could be read: an answer to send, or a connection that
/// is gone.
enum ReadFailure {
    Answer(ApiError),
    Gone(io::Error),
}

fn serve_connection(mut stream: TcpStream, backend: &dyn WorkloadBackend, read_timeout: Duration) {
    let deadline = Instant::now() + read_timeout;
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let (method, path, answer) = match read_request(&mut stream, deadline) {
        Ok(request) => {
            let answer = handle(backend, &request.method, &request.path, &request.body);
            (printable(&request.method), printable(&request.path), answer)
        }
        Err(ReadFailure::Answer(e)) => ("-".into(), "-".into(), Answer::error(&e)),
        Err(ReadFailure::Gone(e)) => {
            eprintln!("capsa-agent: workload api: connection dropped before a whole request: {e}");
            return;
        }
    };
    eprintln!("capsa-agent: workload api {method} {path} -> {}", answer.status);
    if write_answer(&mut stream, &answer).is_ok() {
        linger(stream);
    }
}

/// Up to 64 printable ASCII characters of a client's string, for the log.
fn printable(s: &str) -> String {
    s.chars().take(64).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// Reads one request, its body by `Content-Length`, all before `deadline`.
fn read_request(stream: &mut TcpStream, deadline: Instant) -> Result<HttpRequest, ReadFailure> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 4096];
    let Head { method, path, head_len, framing } = loop {
        let n = read_some(stream, &mut chunk, deadline)?;
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(head) = parse_head(&buf).map_err(ReadFailure::Answer)? {
            if head.framing.expect_continue {
                // curl asks before sending a body over 1 KiB; answer
                // rather than make it wait.
                write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            break head;
        }
    };
    let content_length = framing.content_length;
    let mut body = buf.split_off(head_len.min(buf.len()));
    // A client that sent more than it declared is pipelining; only one
    // request is served per connection, so the rest is dropped.
    body.truncate(content_length);
    while body.len() < content_length {
        let want = (content_length - body.len()).min(chunk.len());
        let n = read_some(stream, chunk.get_mut(..want).unwrap_or_default(), deadline)?;
        body.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    Ok(HttpRequest { method, path, body })
}

struct Framing {
    content_length: usize,
    expect_continue: bool,
}

/// A request's head, parsed.
struct Head {
    method: String,
    path: String,
    head_len: usize,
    framing: Framing,
}

/// The head of a request whose first bytes are `buf`: `None` while it is
/// incomplete, an error to answer when it is malformed or too large.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ApiError> {
    let too_large = || ApiError::new(431, Step::Request, format!("request head exceeds {MAX_HEAD} bytes"));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) if head_len > MAX_HEAD => Err(too_large()),
        Ok(httparse::Status::Complete(head_len)) => {
            let framing = body_framing(request.headers).map_err(|failure| match failure {
                ReadFailure::Answer(e) => e,
                ReadFailure::Gone(e) => ApiError::bad_request(e.to_string()),
            })?;
            Ok(Some(Head {
                method: request.method.unwrap_or_default().to_owned(),
                path: request.path.unwrap_or_default().to_owned(),
                head_len,
                framing,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err(too_large()),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            Err(ApiError::new(431, Step::Request, format!("more than {MAX_HEADERS} request headers")))
        }
        Err(e) => Err(ApiError::bad_request(format!("malformed http request: {e}"))),
    }
}

/// The answer to one request given whole as `raw` (head and body), as the
/// server would send it: its status and body. For fuzzing the request
/// handling without a socket; an incomplete request is a 400 here, where
/// the server would wait for more.
pub fn answer_raw(backend: &dyn WorkloadBackend, raw: &[u8]) -> (u16, Vec<u8>) {
    let answer = match parse_head(raw) {
        Ok(Some(head)) => {
            let body = raw.get(head.head_len..).unwrap_or_default();
            match body.get(..head.framing.content_length) {
                Some(body) => handle(backend, &head.method, &head.path, body),
                None => Answer::error(&ApiError::bad_request("the body is shorter than its content-length")),
            }
        }
        Ok(None) => Answer::error(&ApiError::bad_request("the request is incomplete")),
        Err(e) => Answer::error(&e),
    };
    (answer.status, answer.body.to_vec())
}

/// How the body is framed: `Content-Length` only, at most [`MAX_BODY`].
fn body_framing(headers: &[httparse::Header<'_>]) -> Result<Framing, ReadFailure> {
    let refuse = |status, message: String| Err(ReadFailure::Answer(ApiError::new(status, Step::Request, message)));
    let mut content_length = None;
    let mut expect_continue = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return refuse(400, "transfer-encoding is not supported; send the body with a content-length".into());
        }
        if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = header.value.eq_ignore_ascii_case(b"100-continue");
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).unwrap_or_default().trim();
            // Digits only: `u64::from_str` would also take a sign.
            let parsed = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<u64>().ok())
                .flatten();
            let Some(length) = parsed else {
                return refuse(400, "content-length is not a number".into());
            };
            if content_length.is_some_and(|previous| previous != length) {
                return refuse(400, "conflicting content-length headers".into());
            }
            content_length = Some(length);
        }
    }
    let length = content_length.unwrap_or(0);
    if length > MAX_BODY as u64 {
        return refuse(413, format!("body of {length} bytes exceeds {MAX_BODY}"));
    }
    Ok(Framing { content_length: usize::try_from(length).unwrap_or(MAX_BODY), expect_continue })
}

/// One read that ends by `deadline`: the deadline covers the whole request,
/// so a client trickling a byte at a time cannot hold the thread.
fn read_some(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadFailure> {
    let timed_out = || {
        ReadFailure::Answer(ApiError::new(408, Step::Request, "the request was not received in time; send it at once"))
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    stream.set_read_timeout(Some(left)).map_err(ReadFailure::Gone)?;
    match stream.read(buf) {
        Ok(0) => {
            Err(ReadFailure::Gone(io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed the connection")))
        }
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(timed_out()),
        Err(e) => Err(ReadFailure::Gone(e)),
    }
}

fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), ReadFailure> {
    stream.write_all(bytes).map_err(ReadFailure::Gone)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        s if s >= 500 => "Internal Server Error",
        _ => "Error",
    }
}

fn write_answer(stream: &mut TcpStream, answer: &Answer) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        answer.status,
        reason(answer.status),
        answer.body.len()
    );
    if let Some(allow) = answer.allow {
        head.push_str("Allow: ");
        head.push_str(allow);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&answer.body)?;
    stream.flush()
}

/// Closes the connection so that the answer arrives: closing a socket with
/// unread input resets it, and a reset can discard the answer before the
/// client reads it. So the write side is shut and a little input drained.
fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0_u8; 4096];
    let mut drained = 0;
    while drained < MAX_BODY {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// `POST /attest/raw`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    runtime_data: String,
}

/// `POST /attest/maa`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaaRequest {
    maa_endpoint: String,
    runtime_data: String,
}

/// `POST /key/release`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    maa_endpoint: String,
    akv_endpoint: String,
    kid: String,
    /// The Azure sidecar takes an Entra ID token for Key Vault here. capsa's
    /// key broker authorizes by attestation alone, so it is accepted for
    /// compatibility and skipped unread.
    #[serde(default)]
    #[allow(dead_code)]
    access_token: Option<IgnoredAny>,
}

/// Routes one request and runs it: the method and path, then the execution
/// policy, then the body, then the backend.
fn handle(backend: &dyn WorkloadBackend, method: &str, path: &str, body: &[u8]) -> Answer {
    // The query string selects nothing.
    let path = path.split('?').next().unwrap_or_default();
    let (name, allowed_method) = match path {
        "/status" => (endpoint::STATUS, "GET"),
        "/attest/raw" => (endpoint::ATTEST_RAW, "POST"),
        "/attest/maa" => (endpoint::ATTEST_MAA, "POST"),
        "/key/release" => (endpoint::KEY_RELEASE, "POST"),
        _ => {
            let e = ApiError::new(404, Step::Request, format!("no endpoint {}", printable(path)));
            return Answer::error(&e);
        }
    };
    if method != allowed_method {
        let e = ApiError::new(405, Step::Request, format!("{path} takes {allowed_method}"));
        return Answer { allow: Some(allowed_method), ..Answer::error(&e) };
    }
    if let Err(explanation) = backend.allowed(name) {
        return Answer::error(&ApiError::forbidden(Step::ExecutionPolicy, explanation));
    }
    match run(backend, name, body) {
        Ok(answer) => answer,
        Err(e) => Answer::error(&e),
    }
}

fn run(backend: &dyn WorkloadBackend, name: &str, body: &[u8]) -> Result<Answer, ApiError> {
    match name {
        endpoint::STATUS => Ok(Answer::json(200, &serde_json::json!({ "message": "STATUS OK" }))),
        endpoint::ATTEST_RAW => {
            let request: RawRequest = parse_body(body)?;
            let runtime_data = decode_runtime_data(&request.runtime_data)?;
            let evidence = backend.attest_raw(&runtime_data)?;
            Ok(Answer::json(200, &serde_json::json!({ "report": hex::encode(evidence) })))
        }
        endpoint::ATTEST_MAA => {
            let request: MaaRequest = parse_body(body)?;
            non_empty("maa_endpoint", &request.maa_endpoint)?;
            let runtime_data = decode_runtime_data(&request.runtime_data)?;
            let token = backend.attest_maa(&request.maa_endpoint, &runtime_data)?;
            Ok(Answer::json(200, &serde_json::json!({ "token": token })))
        }
        endpoint::KEY_RELEASE => {
            let request: ReleaseRequest = parse_body(body)?;
            non_empty("maa_endpoint", &request.maa_endpoint)?;
            non_empty("akv_endpoint", &request.akv_endpoint)?;
            non_empty("kid", &request.kid)?;
            let key = backend.release_key(&request.maa_endpoint, &request.akv_endpoint, &request.kid)?;
            Ok(Answer { status: 200, body: key.response_body()?, allow: None })
        }
        other => Err(ApiError::failed(Step::Internal, format!("endpoint {other} has no handler"))),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not the expected json: {e}")))
}

fn decode_runtime_data(encoded: &str) -> Result<Vec<u8>, ApiError> {
    STANDARD.decode(encoded).map_err(|e| ApiError::bad_request(format!("runtime_data is not standard base64: {e}")))
}

fn non_empty(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() { Err(ApiError::bad_request(format!("{field} is empty"))) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[derive(Default)]
    struct Fake {
        denied: Vec<&'static str>,
        fail: Option<ApiError>,
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn record(&self, call: String) -> Result<(), ApiError> {
            self.calls.lock().unwrap().push(call);
            self.fail.clone().map_or(Ok(()), Err)
        }
    }

    impl WorkloadBackend for Fake {
        fn allowed(&self, endpoint: &str) -> Result<(), String> {
            if self.denied.contains(&endpoint) {
                Err(format!("{endpoint} is not allowed by the policy"))
            } else {
                Ok(())
            }
        }

        fn attest_raw(&self, runtime_data: &[u8]) -> Result<Vec<u8>, ApiError> {
            self.record("attest_raw".into())?;
            Ok([b"evidence:".as_slice(), runtime_data].concat())
        }

        fn attest_maa(&self, maa_endpoint: &str, runtime_data: &[u8]) -> Result<String, ApiError> {
            self.record(format!("attest_maa {maa_endpoint}"))?;
            Ok(format!("token-for-{}", String::from_utf8_lossy(runtime_data)))
        }

        fn release_key(&self, maa_endpoint: &str, akv_endpoint: &str, kid: &str) -> Result<Jwk, ApiError> {
            self.record(format!("release_key {maa_endpoint} {akv_endpoint} {kid}"))?;
            Ok(Jwk::oct(Some(kid), SECRET))
        }
    }

    fn start_with(fake: Fake, limits: Limits) -> (SocketAddr, Arc<Fake>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Arc::new(fake);
        serve_with(listener, Arc::clone(&fake) as Arc<dyn WorkloadBackend>, limits).unwrap();
        (addr, fake)
    }

    fn start(fake: Fake) -> (SocketAddr, Arc<Fake>) {
        start_with(fake, Limits::default())
    }

    /// Sends raw bytes and returns the status and the JSON body.
    fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, serde_json::Value) {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(raw).unwrap();
        read_answer(&mut stream)
    }

    fn read_answer(stream: &mut TcpStream) -> (u16, serde_json::Value) {
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let text = String::from_utf8(answer).unwrap();
        let status = text.get(9..12).unwrap().parse().unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        (status, serde_json::from_str(body).unwrap())
    }

    fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, serde_json::Value) {
        let raw = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        exchange(addr, raw.as_bytes())
    }

    fn error_of(value: &serde_json::Value) -> &str {
        value["error"].as_str().unwrap()
    }

    #[test]
    fn status_answers() {
        let (addr, _) = start(Fake::default());
        let (status, body) = exchange(addr, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::json!({"message": "STATUS OK"}));
    }

    #[test]
    fn attest_raw_answers_hex_evidence() {
        let (addr, _) = start(Fake::default());
        let (status, body) = post(addr, "/attest/raw", r#"{"runtime_data": "aGVsbG8="}"#);
        assert_eq!(status, 200);
        assert_eq!(body["report"], hex::encode(b"evidence:hello"));
    }

    #[test]
    fn attest_maa_answers_the_token() {
        let (addr, fake) = start(Fake::default());
        let (status, body) =
            post(addr, "/attest/maa", r#"{"maa_endpoint": "https://maa.example", "runtime_data": "aGk="}"#);
        assert_eq!(status, 200);
        assert_eq!(body["token"], "token-for-hi");
        assert_eq!(*fake.calls.lock().unwrap(), ["attest_maa https://maa.example"]);
    }

    #[test]
    fn key_release_answers_the_jwk_as_a_string() {
        let (addr, fake) = start(Fake::default());
        let request = r#"{"maa_endpoint": "m", "akv_endpoint": "a", "kid": "k1", "access_token": "ignored"}"#;
        let (status, body) = post(addr, "/key/release", request);
        assert_eq!(status, 200);
        let jwk: serde_json::Value = serde_json::from_str(body["key"].as_str().unwrap()).unwrap();
        assert_eq!(jwk["kty"], "oct");
        assert_eq!(jwk["kid"], "k1");
        assert_eq!(URL_SAFE_NO_PAD.decode(jwk["k"].as_str().unwrap()).unwrap(), SECRET);
        assert_eq!(*fake.calls.lock().unwrap(), ["release_key m a k1"]);
    }

    #[test]
    fn malformed_requests_are_400() {
        let (addr, fake) = start(Fake::default());
        for (path, body, expected) in [
            ("/attest/raw", "not json", "request: the body is not the expected json"),
            ("/attest/raw", "{}", "missing field `runtime_data`"),
            ("/attest/raw", r#"{"runtime_data": "aGk=", "extra": 1}"#, "unknown field `extra`"),
            ("/attest/raw", r#"{"runtime_data": "!!"}"#, "request: runtime_data is not standard base64"),
            ("/attest/maa", r#"{"runtime_data": "aGk="}"#, "missing field `maa_endpoint`"),
            ("/attest/maa", r#"{"maa_endpoint": "", "runtime_data": ""}"#, "request: maa_endpoint is empty"),
            ("/key/release", r#"{"maa_endpoint": "m", "akv_endpoint": "a"}"#, "missing field `kid`"),
            ("/key/release", r#"{"maa_endpoint": "m", "akv_endpoint": "a", "kid": ""}"#, "request: kid is empty"),
        ] {
            let (status, answer) = post(addr, path, body);
            assert_eq!(status, 400, "{path} {body}");
            assert!(error_of(&answer).contains(expected), "{path} {body}: {answer}");
        }
        let (status, answer) = exchange(addr, b"NOT HTTP\r\n\r\n");
        assert_eq!(status, 400, "{answer}");
        let chunked = b"POST /attest/raw HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(exchange(addr, chunked).0, 400);
        let signed = b"POST /attest/raw HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}";
        assert_eq!(exchange(addr, signed).0, 400);
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let (addr, _) = start(Fake::default());
        let (status, body) = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!((status, error_of(&body)), (404, "request: no endpoint /nope"));
        let (status, body) = exchange(addr, b"GET /key/release HTTP/1.1\r\n\r\n");
        assert_eq!((status, error_of(&body)), (405, "request: /key/release takes POST"));
        let (status, _) = post(addr, "/status", "{}");
        assert_eq!(status, 405);
    }

    #[test]
    fn the_execution_policy_is_asked_first() {
        let fake = Fake { denied: vec![endpoint::KEY_RELEASE, endpoint::STATUS], ..Fake::default() };
        let (addr, fake) = start(fake);
        let (status, body) = post(addr, "/key/release", r#"{"maa_endpoint": "m", "akv_endpoint": "a", "kid": "k"}"#);
        assert_eq!(status, 403);
        assert_eq!(error_of(&body), "execution policy: key/release is not allowed by the policy");
        // Denied before the body is even parsed.
        assert_eq!(post(addr, "/key/release", "garbage").0, 403);
        assert_eq!(exchange(addr, b"GET /status HTTP/1.1\r\n\r\n").0, 403);
        assert_eq!(post(addr, "/attest/raw", r#"{"runtime_data": ""}"#).0, 200);
        assert_eq!(*fake.calls.lock().unwrap(), ["attest_raw"]);
    }

    #[test]
    fn backend_errors_keep_their_status_and_step() {
        let release = r#"{"maa_endpoint": "m", "akv_endpoint": "a", "kid": "k"}"#;
        let refused = ApiError::forbidden(Step::ReleasePolicy, "claim x-ms-sevsnpvm-is-debuggable is true");
        let (addr, _) = start(Fake { fail: Some(refused), ..Fake::default() });
        let (status, body) = post(addr, "/key/release", release);
        assert_eq!((status, error_of(&body)), (403, "release policy: claim x-ms-sevsnpvm-is-debuggable is true"));

        let failed = ApiError::failed(Step::Token, "the attestation service is unreachable");
        let (addr, _) = start(Fake { fail: Some(failed), ..Fake::default() });
        let (status, body) = post(addr, "/attest/maa", r#"{"maa_endpoint": "m", "runtime_data": ""}"#);
        assert_eq!((status, error_of(&body)), (500, "token: the attestation service is unreachable"));

        let odd = ApiError::new(200, Step::Unwrap, "not a real success");
        let (addr, _) = start(Fake { fail: Some(odd), ..Fake::default() });
        assert_eq!(post(addr, "/key/release", release).0, 500);
    }

    #[test]
    fn oversized_bodies_are_413_unread() {
        let (addr, fake) = start(Fake::default());
        let raw = format!("POST /attest/raw HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let (status, body) = exchange(addr, raw.as_bytes());
        assert_eq!(status, 413);
        assert!(error_of(&body).contains("exceeds 65536"), "{body}");
        // The largest allowed body is read whole.
        let data = STANDARD.encode(vec![7_u8; (MAX_BODY - 64) / 4 * 3]);
        let (status, _) = post(addr, "/attest/raw", &format!(r#"{{"runtime_data":"{data}"}}"#));
        assert_eq!(status, 200);
        assert_eq!(fake.calls.lock().unwrap().len(), 1);
        let head = format!("GET /status HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD + 1));
        assert_eq!(exchange(addr, head.as_bytes()).0, 431);
    }

    #[test]
    fn expect_continue_is_answered() {
        let (addr, _) = start(Fake::default());
        let mut stream = TcpStream::connect(addr).unwrap();
        let body = r#"{"runtime_data": "aGk="}"#;
        let head =
            format!("POST /attest/raw HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).unwrap();
        let mut interim = [0_u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(body.as_bytes()).unwrap();
        assert_eq!(read_answer(&mut stream).0, 200);
    }

    #[test]
    fn a_trickled_request_times_out_as_a_whole() {
        let limits = Limits { read_timeout: Duration::from_millis(400), ..Limits::default() };
        let (addr, fake) = start_with(Fake::default(), limits);
        let mut stream = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        // A byte every 100 ms: each read is quick, the whole is too slow.
        for byte in b"POST /attest/raw HTTP/1.1\r\n" {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
            if started.elapsed() > Duration::from_millis(800) {
                break;
            }
        }
        let (status, body) = read_answer(&mut stream);
        assert_eq!(status, 408, "{body}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn connections_over_the_limit_wait_their_turn() {
        let limits = Limits { read_timeout: Duration::from_secs(5), max_connections: 1 };
        let (addr, _) = start_with(Fake::default(), limits);
        let mut first = TcpStream::connect(addr).unwrap();
        first.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
        thread::sleep(Duration::from_millis(100));
        let mut second = TcpStream::connect(addr).unwrap();
        second.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();
        second.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut byte = [0_u8; 1];
        let waiting = second.read(&mut byte).unwrap_err();
        assert!(matches!(waiting.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{waiting}");
        first.write_all(b"\r\n").unwrap();
        assert_eq!(read_answer(&mut first).0, 200);
        assert_eq!(read_answer(&mut second).0, 200);
    }

    #[test]
    fn the_sdk_client_speaks_this_server() {
        let (addr, _) = start(Fake { denied: vec![endpoint::ATTEST_MAA], ..Fake::default() });
        let client = capsa_sdk::WorkloadClient::new(addr.to_string());
        assert_eq!(client.status().unwrap(), "STATUS OK");
        assert_eq!(client.evidence(b"rd").unwrap(), b"evidence:rd");
        let key = client.release_key("m", "a", "kid-9").unwrap();
        assert_eq!((key.kty(), key.kid(), key.octets()), ("oct", Some("kid-9"), Some(SECRET)));
        let e = client.token("m", b"").unwrap_err();
        assert_eq!(e.status(), Some(403));
        assert_eq!(e.api_message(), Some("execution policy: attest/maa is not allowed by the policy"));
    }

    #[test]
    fn jwk_debug_shows_no_key_material() {
        let jwk = Jwk::oct(Some("kid-1"), SECRET);
        let debug = format!("{jwk:?}");
        assert!(debug.contains("oct") && debug.contains("kid-1"), "{debug}");
        assert!(!debug.contains(&URL_SAFE_NO_PAD.encode(SECRET)), "{debug}");
        assert!(!debug.contains("\"k\""), "{debug}");

        let rsa = r#"{"kty":"RSA","n":"bm4","e":"AQAB","d":"c2VjcmV0LWQ"}"#;
        let jwk = Jwk::from_json(Zeroizing::new(rsa.to_owned())).unwrap();
        assert_eq!((jwk.kty(), jwk.kid()), ("RSA", None));
        assert!(!format!("{jwk:?}").contains("c2VjcmV0LWQ"));
    }

    #[test]
    fn jwk_from_json_requires_an_object_with_kty() {
        for bad in ["", "[]", r#"{"kid":"x"}"#, r#"{"kty":1}"#, r#"{"kty":"oct"} trailing"#, r#"{"kty":"oct","k":"#] {
            let e = Jwk::from_json(Zeroizing::new(bad.to_owned())).unwrap_err();
            assert_eq!((e.status, e.step), (500, Step::Unwrap), "{bad}");
        }
        let escaped = Jwk::from_json(Zeroizing::new(r#"{"kty":"oct","kid":"a\"b","k":"AA"}"#.to_owned())).unwrap();
        assert_eq!(escaped.kid(), Some("a\"b"));
        let body = escaped.response_body().unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["key"], r#"{"kty":"oct","kid":"a\"b","k":"AA"}"#);
    }
}
