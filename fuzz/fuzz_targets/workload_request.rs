//! The workload API's request handling: the input is one raw HTTP request
//! from a container (head and body), answered by a backend that allows
//! everything and answers every call, so that every path's parsing runs.
//! Every answer must have a status the API documents and a JSON body.
#![no_main]

use capsa_agent::workload::{ApiError, Jwk, Step, WorkloadBackend, answer_raw};
use libfuzzer_sys::fuzz_target;

struct Backend;

impl WorkloadBackend for Backend {
    fn allowed(&self, endpoint: &str) -> Result<(), String> {
        if endpoint == "attest/maa" { Err("denied for the fuzzer".into()) } else { Ok(()) }
    }

    fn attest_raw(&self, runtime_data: &[u8]) -> Result<Vec<u8>, ApiError> {
        Ok(runtime_data.iter().rev().copied().collect())
    }

    fn attest_maa(&self, _maa_endpoint: &str, _runtime_data: &[u8]) -> Result<String, ApiError> {
        Err(ApiError::failed(Step::Token, "unreachable for the fuzzer"))
    }

    fn release_key(&self, _maa_endpoint: &str, _akv_endpoint: &str, kid: &str) -> Result<Jwk, ApiError> {
        Ok(Jwk::oct(Some(kid), &[0x42; 32]))
    }
}

fuzz_target!(|data: &[u8]| {
    let (status, body) = answer_raw(&Backend, data);
    assert!(matches!(status, 200 | 400 | 403 | 404 | 405 | 408 | 413 | 431 | 500), "status {status}");
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "a JSON body");
});
