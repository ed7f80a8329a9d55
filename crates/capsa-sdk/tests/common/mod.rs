//! A fake workload API on 127.0.0.1: canned answers, recorded requests.
//! Written with std::net because capsa-sdk must not depend on capsa-agent.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

/// A request as the fake received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
}

type Answerer = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

/// Starts the fake; `answer` maps each request to a status and body.
pub fn fake_api(
    answer: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let answer: Arc<Answerer> = Arc::new(answer);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (record, answer) = (Arc::clone(&record), Arc::clone(&answer));
            thread::spawn(move || serve(stream, &record, answer.as_ref()));
        }
    });
    (addr, seen)
}

fn serve(mut stream: TcpStream, record: &Mutex<Vec<Seen>>, answer: &Answerer) {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the client closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap().split(' ');
    let (method, path) = (request_line.next().unwrap().to_owned(), request_line.next().unwrap().to_owned());
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse().unwrap());
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + length];
    let body = if body.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(body).unwrap() };
    let seen = Seen { method, path, body };
    let (status, text) = answer(&seen);
    record.lock().unwrap().push(seen);
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).unwrap();
}

/// The `/key/release` answer for an oct key, as the agent writes it: the
/// JWK as a JSON string.
pub fn oct_key_answer(kid: &str, key: &[u8]) -> String {
    use base64::Engine as _;
    let jwk = serde_json::json!({
        "kty": "oct",
        "kid": kid,
        "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key),
    });
    serde_json::json!({ "key": jwk.to_string() }).to_string()
}
