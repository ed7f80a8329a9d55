//! The client against a fake workload API: request shapes, answers, and
//! how errors map.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use base64::Engine as _;
use capsa_sdk::{ClientError, WorkloadClient};
use common::{fake_api, oct_key_answer};

#[test]
fn every_endpoint_round_trips() {
    let (addr, seen) = fake_api(|req| match req.path.as_str() {
        "/status" => (200, r#"{"message": "STATUS OK"}"#.into()),
        "/attest/raw" => (200, format!(r#"{{"report": "{}"}}"#, hex::encode(b"evidence"))),
        "/attest/maa" => (200, r#"{"token": "a.b.c"}"#.into()),
        "/key/release" => (200, oct_key_answer("k1", &[9; 32])),
        _ => (404, r#"{"error": "request: no endpoint"}"#.into()),
    });
    let client = WorkloadClient::new(addr.to_string());
    assert_eq!(client.status().unwrap(), "STATUS OK");
    assert_eq!(client.evidence(b"nonce").unwrap(), b"evidence");
    assert_eq!(client.token("https://maa", b"rd").unwrap(), "a.b.c");
    let key = client.release_key("https://maa", "https://akv", "k1").unwrap();
    assert_eq!((key.kty(), key.kid(), key.octets()), ("oct", Some("k1"), Some([9_u8; 32].as_slice())));
    assert!(!format!("{key:?}").contains(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9_u8; 32])));

    let seen = seen.lock().unwrap();
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
    assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("GET", "/status"));
    assert_eq!(seen[1].body, serde_json::json!({"runtime_data": b64(b"nonce")}));
    assert_eq!(seen[2].body, serde_json::json!({"maa_endpoint": "https://maa", "runtime_data": b64(b"rd")}));
    assert_eq!(seen[3].method, "POST");
    assert_eq!(
        seen[3].body,
        serde_json::json!({"maa_endpoint": "https://maa", "akv_endpoint": "https://akv", "kid": "k1"})
    );
}

#[test]
fn errors_carry_the_status_and_the_api_message() {
    let (addr, _) = fake_api(|req| match req.path.as_str() {
        "/key/release" => (403, r#"{"error": "release policy: x-ms-sevsnpvm-is-debuggable must be false"}"#.into()),
        "/attest/maa" => (500, r#"{"error": "token: the attestation service is unreachable"}"#.into()),
        "/attest/raw" => (502, "<html>bad gateway</html>".into()),
        _ => (200, "not json".into()),
    });
    let client = WorkloadClient::new(addr.to_string());

    let e = client.release_key("m", "a", "k").unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert_eq!(e.api_message(), Some("release policy: x-ms-sevsnpvm-is-debuggable must be false"));
    assert_eq!(
        e.to_string(),
        "the workload api answered 403: release policy: x-ms-sevsnpvm-is-debuggable must be false"
    );

    let e = client.token("m", b"").unwrap_err();
    assert!(matches!(&e, ClientError::Api { status: 500, message } if message.starts_with("token: ")), "{e}");

    let e = client.evidence(b"").unwrap_err();
    assert_eq!((e.status(), e.api_message()), (Some(502), Some("<html>bad gateway</html>")));

    let e = client.status().unwrap_err();
    assert!(matches!(e, ClientError::Answer(_)), "{e}");
    assert_eq!(e.status(), None);
}

#[test]
fn an_absent_api_is_a_connect_error() {
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = WorkloadClient::new(addr.to_string()).status().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("CAPSA_WORKLOAD_API"), "{e}");
}
