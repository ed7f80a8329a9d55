//! capsa-unseal end to end: the data owner seals, the workload unseals with
//! the key released by a fake workload API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fake_api, oct_key_answer};

const KEY: [u8; 32] = *b"an example 256-bit data key!!!!!";
const PLAIN: &[u8] = b"the data owner's secret\n";

fn unseal_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsa-unseal"))
}

fn seal_fixture(dir: &Path) -> std::path::PathBuf {
    std::fs::write(dir.join("key.raw"), KEY).unwrap();
    std::fs::write(dir.join("plain.txt"), PLAIN).unwrap();
    let sealed = dir.join("data.sealed");
    let out = unseal_cmd()
        .arg("seal")
        .args(["--key-file".as_ref(), dir.join("key.raw").as_os_str()])
        .args(["--in".as_ref(), dir.join("plain.txt").as_os_str()])
        .args(["--out".as_ref(), sealed.as_os_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sealed
}

fn unseal(api: &str, sealed: &Path) -> Output {
    unseal_cmd()
        .env("CAPSA_WORKLOAD_API", api)
        .args(["--maa", "https://trust.example", "--akv", "https://kb.example", "--kid", "data-key"])
        .arg(sealed)
        .output()
        .unwrap()
}

#[test]
fn seal_then_unseal_through_the_workload_api() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = seal_fixture(dir.path());
    let on_disk = std::fs::read(&sealed).unwrap();
    assert_eq!(on_disk.len(), 12 + PLAIN.len() + 16);
    assert!(!on_disk.windows(6).any(|w| w == b"secret"));

    let (addr, seen) = fake_api(|_| (200, oct_key_answer("data-key", &KEY)));
    let out = unseal(&addr.to_string(), &sealed);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, PLAIN);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/key/release");
    assert_eq!(seen[0].body["kid"], "data-key");
    assert_eq!(seen[0].body["maa_endpoint"], "https://trust.example");
    assert_eq!(seen[0].body["akv_endpoint"], "https://kb.example");
}

#[test]
fn failures_are_one_line_naming_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = seal_fixture(dir.path());
    let stderr = |out: &Output| {
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        let text = String::from_utf8(out.stderr.clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        text
    };

    let (refusing, _) =
        fake_api(|_| (403, r#"{"error": "release policy: claim x-ms-sevsnpvm-hostdata does not match"}"#.into()));
    let text = stderr(&unseal(&refusing.to_string(), &sealed));
    assert_eq!(
        text,
        "capsa-unseal: key release refused (403): release policy: claim x-ms-sevsnpvm-hostdata does not match\n"
    );

    let (failing, _) = fake_api(|_| (500, r#"{"error": "token: the attestation service is unreachable"}"#.into()));
    let text = stderr(&unseal(&failing.to_string(), &sealed));
    assert_eq!(text, "capsa-unseal: key release failed (500): token: the attestation service is unreachable\n");

    let (wrong_key, _) = fake_api(|_| (200, oct_key_answer("data-key", &[1; 32])));
    let text = stderr(&unseal(&wrong_key.to_string(), &sealed));
    assert!(text.starts_with("capsa-unseal: cannot unseal ") && text.contains("wrong key"), "{text}");

    let (rsa, _) = fake_api(|_| (200, serde_json::json!({"key": r#"{"kty":"RSA","n":"AQ","e":"AQAB"}"#}).to_string()));
    let text = stderr(&unseal(&rsa.to_string(), &sealed));
    assert!(text.contains("is a RSA key"), "{text}");

    let text = stderr(&unseal("127.0.0.1:1", &sealed));
    assert!(text.starts_with("capsa-unseal: key release of data-key failed: cannot reach the workload api"), "{text}");

    let text = stderr(&unseal("127.0.0.1:1", &dir.path().join("missing")));
    assert!(text.starts_with("capsa-unseal: cannot read "), "{text}");
}
