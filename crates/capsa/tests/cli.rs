//! The `capsa` command line, end to end: every real evidence file verifies
//! as its PROVENANCE.md says, refusals exit 1 with one line saying why,
//! unusable input exits 2, and the sim platform round-trips.

use std::path::Path;
use std::process::{Command, Output};

use capsa_testkit::TempDir;

const EVIDENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/testdata/evidence");

fn evidence(path: &str) -> String {
    format!("{EVIDENCE}/{path}")
}

fn capsa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsa")).args(args).env("NO_COLOR", "1").output().expect("run capsa")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

#[test]
fn milan_report_verifies_with_pinned_roots() {
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("snp/milan-v2-report.bin"),
        "--tee",
        "snp",
        "--vcek",
        &evidence("snp/milan-v2-vcek.der"),
        "--at",
        "2025-06-01T00:00:00Z",
        "--json",
    ]);
    assert_exit(&o, 0);
    let claims = json(&o);
    assert_eq!(claims["x-ms-attestation-type"], "sevsnpvm");
    assert_eq!(claims["x-ms-sevsnpvm-bootloader-svn"], 3);
    assert_eq!(claims["x-ms-sevsnpvm-is-debuggable"], false);
}

#[test]
fn milan_report_given_as_hex_verifies_and_prints_a_table() {
    let dir = TempDir::new("hex");
    let hex_path = dir.arg("report.hex");
    let bytes = std::fs::read(evidence("snp/milan-v2-report.bin")).unwrap();
    std::fs::write(&hex_path, hex::encode(bytes)).unwrap();
    let o = capsa(&[
        "evidence",
        "verify",
        &hex_path,
        "--tee",
        "snp",
        "--vcek",
        &evidence("snp/milan-v2-vcek.der"),
        "--at",
        "2025-06-01T00:00:00Z",
    ]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("x-ms-sevsnpvm-launchmeasurement"), "{}", stdout(&o));
}

#[test]
fn vlek_report_verifies_inside_the_vleks_validity_and_not_after() {
    let args = |at| {
        capsa(&[
            "evidence",
            "verify",
            &evidence("snp/vlek-v3-report.bin"),
            "--tee",
            "snp",
            "--vcek",
            &evidence("snp/vlek.der"),
            "--at",
            at,
            "--json",
        ])
    };
    let o = args("2025-06-01T00:00:00Z");
    assert_exit(&o, 0);
    assert_eq!(json(&o)["x-capsa-sevsnpvm-signing-key"], "vlek");
    let o = args("2025-12-11T00:00:00Z");
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("VLEK certificate is not valid at"), "{}", stderr(&o));
}

#[test]
fn tampered_report_is_refused_with_one_line() {
    let dir = TempDir::new("tamper");
    let mut bytes = std::fs::read(evidence("snp/milan-v2-report.bin")).unwrap();
    bytes[0x90] ^= 1;
    let path = dir.arg("tampered.bin");
    std::fs::write(&path, bytes).unwrap();
    let o = capsa(&[
        "evidence",
        "verify",
        &path,
        "--tee",
        "snp",
        "--vcek",
        &evidence("snp/milan-v2-vcek.der"),
        "--at",
        "2025-06-01T00:00:00Z",
    ]);
    assert_exit(&o, 1);
    assert_eq!(stderr(&o).trim(), "capsa: report signature does not verify with the VCEK");
    assert!(o.stdout.is_empty());
}

#[test]
fn invalid_vcek_and_wrong_chain_are_refused() {
    for vcek in ["snp/vcek-invalid-legacy.der", "snp/vcek-invalid-new.der"] {
        let o = capsa(&[
            "evidence",
            "verify",
            &evidence("snp/milan-v2-report.bin"),
            "--tee",
            "snp",
            "--vcek",
            &evidence(vcek),
            "--at",
            "2025-06-01T00:00:00Z",
        ]);
        assert_exit(&o, 1);
        assert!(stderr(&o).contains("VCEK certificate's signature does not verify"), "{}", stderr(&o));
    }
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("snp/milan-v2-report.bin"),
        "--tee",
        "snp",
        "--vcek",
        &evidence("snp/milan-v2-vcek.der"),
        "--chain",
        &evidence("snp/amd/genoa_ask_ark_asvk.pem"),
        "--at",
        "2025-06-01T00:00:00Z",
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no ASK (CN=SEV-Milan)"), "{}", stderr(&o));
}

#[test]
fn unusable_input_exits_2_with_what_to_do() {
    let o = capsa(&["evidence", "verify", "/nonexistent", "--tee", "snp"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("cannot read /nonexistent"));
    let o = capsa(&["evidence", "verify", &evidence("snp/milan-v2-report.bin"), "--tee", "snp"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("pass --vcek"), "{}", stderr(&o));
    assert!(stderr(&o).contains("kdsintf.amd.com/vcek/v1/"), "{}", stderr(&o));
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("snp/milan-v2-vcek.der"),
        "--tee",
        "snp",
        "--vcek",
        &evidence("snp/milan-v2-vcek.der"),
    ]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("1184 bytes"), "{}", stderr(&o));
    let o = capsa(&["evidence", "verify", &evidence("tdx/quote.bin"), "--tee", "tdx"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--collateral"), "{}", stderr(&o));
    let o = capsa(&["evidence", "verify", &evidence("snp/milan-v2-report.bin"), "--tee", "sev"]);
    assert_exit(&o, 2);
    let o = capsa(&["evidence", "verify", &evidence("snp/milan-v2-report.bin"), "--tee", "snp", "--at", "yesterday"]);
    assert_exit(&o, 2);
}

#[test]
fn tdx_quotes_verify_and_surface_their_tcb_status() {
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("tdx/quote.bin"),
        "--tee",
        "tdx",
        "--collateral",
        &evidence("tdx/collateral.json"),
        "--at",
        "2025-07-01T00:00:00Z",
        "--json",
    ]);
    assert_exit(&o, 0);
    let claims = json(&o);
    assert_eq!(claims["x-ms-attestation-type"], "tdxvm");
    assert!(claims["tdx_mrtd"].as_str().unwrap().len() == 96);

    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("tdx/quote-outdated.bin"),
        "--tee",
        "tdx",
        "--collateral",
        &evidence("tdx/collateral-outdated.json"),
        "--at",
        "2026-03-01T00:00:00Z",
        "--json",
    ]);
    assert_exit(&o, 1);
    assert!(stderr(&o).starts_with("capsa: TCB status OutOfDate"), "{}", stderr(&o));
}

#[test]
fn sgx_quote_verifies() {
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("sgx/quote.bin"),
        "--tee",
        "sgx",
        "--collateral",
        &evidence("sgx/collateral.json"),
        "--at",
        "2025-07-01T00:00:00Z",
        "--json",
    ]);
    assert_exit(&o, 0);
    let claims = json(&o);
    assert_eq!(claims["x-ms-attestation-type"], "sgx");
    assert_eq!(claims["x-ms-sgx-mrenclave"].as_str().unwrap().len(), 64);
    // The same quote presented as TDX is refused.
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("sgx/quote.bin"),
        "--tee",
        "tdx",
        "--collateral",
        &evidence("sgx/collateral.json"),
        "--at",
        "2025-07-01T00:00:00Z",
    ]);
    assert_ne!(o.status.code(), Some(0));
}

#[test]
fn azure_vtpm_evidence_verifies() {
    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("az-snp-vtpm/evidence-v1.json"),
        "--tee",
        "az-snp-vtpm",
        "--at",
        "2026-01-01T00:00:00Z",
        "--json",
    ]);
    assert_exit(&o, 0);
    let claims = json(&o);
    assert_eq!(claims["x-ms-attestation-type"], "azurevm");
    assert_eq!(claims["x-ms-isolation-tee"]["x-ms-attestation-type"], "sevsnpvm");

    let o = capsa(&[
        "evidence",
        "verify",
        &evidence("az-snp-vtpm/hcl-report.bin"),
        "--tee",
        "az-snp-vtpm",
        "--vcek",
        &evidence("az-snp-vtpm/vcek.pem"),
        "--at",
        "2026-01-01T00:00:00Z",
        "--json",
    ]);
    assert_exit(&o, 0);
}

#[test]
fn show_lists_every_field_without_verifying() {
    let o = capsa(&["evidence", "show", &evidence("snp/milan-v2-report.bin"), "--tee", "snp"]);
    assert_exit(&o, 0);
    for field in ["version", "policy", "measurement", "host_data", "reported_tcb", "chip_id", "signature_r"] {
        assert!(stdout(&o).lines().any(|l| l.starts_with(field)), "missing {field}:\n{}", stdout(&o));
    }
    for (tee, file) in
        [("tdx", "tdx/quote.bin"), ("sgx", "sgx/quote.bin"), ("az-snp-vtpm", "az-snp-vtpm/evidence-v1.json")]
    {
        let o = capsa(&["evidence", "show", &evidence(file), "--tee", tee]);
        assert_exit(&o, 0);
        assert!(stdout(&o).lines().count() > 10, "{tee}: {}", stdout(&o));
    }
}

#[test]
fn sim_round_trip_and_refusal_without_allow_sim() {
    let dir = TempDir::new("sim");
    let state = dir.arg("state");
    assert_exit(&capsa(&["sim", "init", "--dir", &state]), 0);
    assert_exit(&capsa(&["sim", "init", "--dir", &state]), 0);
    let certs = dir.arg("certs");
    assert_exit(&capsa(&["sim", "certs", "--dir", &state, "--out", &certs]), 0);
    let measurement = "ab".repeat(48);
    let host_data = "cd".repeat(32);
    let report_data = "ef".repeat(64);
    let report = dir.arg("report.bin");
    assert_exit(
        &capsa(&[
            "sim",
            "report",
            "--dir",
            &state,
            "--measurement",
            &measurement,
            "--host-data",
            &host_data,
            "--report-data",
            &report_data,
            "--out",
            &report,
        ]),
        0,
    );
    assert_eq!(std::fs::metadata(&report).unwrap().len(), 1184);
    let vcek = format!("{certs}/vcek.pem");
    let chain = format!("{certs}/chain.pem");
    let o = capsa(&[
        "evidence",
        "verify",
        &report,
        "--tee",
        "snp",
        "--vcek",
        &vcek,
        "--chain",
        &chain,
        "--allow-sim",
        "--json",
    ]);
    assert_exit(&o, 0);
    let claims = json(&o);
    assert_eq!(claims["x-ms-attestation-type"], "sim");
    assert_eq!(claims["x-ms-sevsnpvm-launchmeasurement"], measurement);
    assert_eq!(claims["x-ms-sevsnpvm-hostdata"], host_data);
    assert_eq!(claims["x-ms-sevsnpvm-reportdata"], report_data);
    assert!(stderr(&o).contains("sim evidence"), "{}", stderr(&o));

    let o = capsa(&["evidence", "verify", &report, "--tee", "snp", "--vcek", &vcek, "--chain", &chain]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("sim platform root") && stderr(&o).contains("--allow-sim"), "{}", stderr(&o));

    // Without the explicit chain the sim VCEK cannot reach AMD's roots.
    let o = capsa(&["evidence", "verify", &report, "--tee", "snp", "--vcek", &vcek, "--allow-sim"]);
    assert_exit(&o, 1);

    // Bad hex is a usage error that says the expected size.
    let o = capsa(&[
        "sim",
        "report",
        "--dir",
        &state,
        "--measurement",
        "abcd",
        "--host-data",
        &host_data,
        "--report-data",
        &report_data,
        "--out",
        &report,
    ]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--measurement must be 48 bytes"), "{}", stderr(&o));
    assert!(Path::new(&report).exists());
}

#[test]
fn sim_report_with_debug_policy_says_so() {
    let dir = TempDir::new("simdebug");
    let state = dir.arg("state");
    let certs = dir.arg("certs");
    let report = dir.arg("r.bin");
    assert_exit(&capsa(&["sim", "certs", "--dir", &state, "--out", &certs]), 2);
    assert_exit(&capsa(&["sim", "init", "--dir", &state]), 0);
    assert_exit(&capsa(&["sim", "certs", "--dir", &state, "--out", &certs]), 0);
    assert_exit(
        &capsa(&[
            "sim",
            "report",
            "--dir",
            &state,
            "--measurement",
            &"00".repeat(48),
            "--host-data",
            &"00".repeat(32),
            "--report-data",
            &"00".repeat(64),
            "--policy-debug",
            "--out",
            &report,
        ]),
        0,
    );
    let o = capsa(&[
        "evidence",
        "verify",
        &report,
        "--tee",
        "snp",
        "--vcek",
        &format!("{certs}/vcek.pem"),
        "--chain",
        &format!("{certs}/chain.pem"),
        "--allow-sim",
        "--json",
    ]);
    assert_exit(&o, 0);
    assert_eq!(json(&o)["x-ms-sevsnpvm-is-debuggable"], true);
}

#[test]
fn verity_root_hash_equals_veritysetup() {
    if !capsa_testkit::have("veritysetup") {
        return;
    }
    let dir = TempDir::new("verity");
    let data = dir.arg("data.img");
    let bytes: Vec<u8> = (0..(1u32 << 20) + 8192).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&data, &bytes[..1 << 20]).unwrap();
    for salt in [None, Some("00112233445566778899aabbccddeeff")] {
        let hash_file = dir.arg("hash.img");
        let mut veritysetup = Command::new("veritysetup");
        veritysetup.args([
            "format",
            "--hash",
            "sha256",
            "--data-block-size",
            "4096",
            "--hash-block-size",
            "4096",
            "--format",
            "1",
        ]);
        veritysetup.args(["--salt", salt.unwrap_or("-"), &data, &hash_file]);
        let out = veritysetup.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let expected = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:").map(|h| h.trim().to_owned()))
            .unwrap();
        let mut args = vec!["verity", data.as_str()];
        if let Some(s) = salt {
            args.extend(["--salt", s]);
        }
        let o = capsa(&args);
        assert_exit(&o, 0);
        assert_eq!(stdout(&o).trim(), expected, "salt {salt:?}");
    }
    // Sizes that are not whole blocks: veritysetup refuses under one block
    // and leaves the tail out above; `capsa verity` does the same (and warns).
    for len in [0usize, 1, 4095, 4096, 4097, 12_345] {
        let path = dir.arg(&format!("len{len}.img"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        let hash_file = dir.arg("hash.img");
        let theirs = Command::new("veritysetup")
            .args(["format", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096"])
            .args(["--format", "1", "--salt", "-", &path, &hash_file])
            .output()
            .unwrap();
        let ours = capsa(&["verity", &path]);
        if theirs.status.success() {
            let expected = String::from_utf8_lossy(&theirs.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Root hash:").map(|h| h.trim().to_owned()))
                .unwrap();
            assert_exit(&ours, 0);
            assert_eq!(stdout(&ours).trim(), expected, "{len} bytes");
            assert_eq!(stderr(&ours).contains("outside the tree"), len % 4096 != 0, "{len} bytes: {}", stderr(&ours));
        } else {
            assert_exit(&ours, 2);
        }
    }
    let o = capsa(&["verity", "/nonexistent"]);
    assert_exit(&o, 2);
}

#[test]
fn a_reader_that_stops_early_does_not_make_capsa_panic() {
    use std::io::Read as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsa"))
        .args(["evidence", "show", &evidence("snp/milan-v2-report.bin"), "--tee", "snp"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end of stdout at once, as `grep -q` or `head -1` would.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");
}
