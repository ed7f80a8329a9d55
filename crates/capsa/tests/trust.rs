//! `capsa trust` end to end, as an operator runs it: a `capsa trust serve`
//! child process killed with SIGKILL while keys are being created keeps
//! every key whose creation it acknowledged, and the client commands
//! round-trip a key with the CLI's exit codes (0 done, 1 refused, 2 input
//! that could not be used).

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_tee::sim::{ReportRequest, SimPlatform};
use capsa_testkit::TempDir;
use capsa_trust::attestation::EvidenceKind;
use capsa_trust::client::{self, Client, ClientError, RuntimeKey};
use serde_json::{Value, json};

const HOST_DATA: [u8; 32] = [0x22; 32];
const OTHER_HOST_DATA: [u8; 32] = [0x33; 32];
const MEASUREMENT: [u8; 48] = [0x11; 48];
/// The issuer the durability test's server uses whatever port it listens on.
const ISSUER: &str = "http://capsa.test";
/// How long any one `capsa` invocation, or a server's start or stop, may take.
const LIMIT: Duration = Duration::from_secs(60);

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsa"));
    command
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("CAPSA_TRUST_URL")
        .env_remove("CAPSA_TRUST_ADMIN_TOKEN_FILE")
        .stdin(Stdio::null());
    command
}

/// The child's exit status, or `None` if it is still running after `limit`.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for capsa") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `capsa args`, killing it (and failing) if it takes longer than [`LIMIT`].
fn capsa(args: &[&str]) -> Output {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let file = |stream: &str| std::env::temp_dir().join(format!("capsa-trust-{}-{run}.{stream}", std::process::id()));
    let (out, err) = (file("out"), file("err"));
    let mut child = command(args)
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("run capsa");
    let status = wait_for(&mut child, LIMIT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = Output {
        status: status.unwrap_or_else(|| panic!("capsa {args:?} did not finish within {LIMIT:?}")),
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    };
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(err);
    output
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

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `GET /health` answers 200.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// A `capsa trust serve --allow-sim` child process; killed when dropped,
/// so a failing test leaves no server behind.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    /// Starts a server on `data` on a free port (another if the port was
    /// taken in the meantime) with `extra` arguments, and waits until it
    /// answers `/health`. Its standard error goes to a log in `logs`.
    fn start(data: &str, logs: &Path, extra: &[&str]) -> Self {
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = logs.join(format!("serve-{}.log", addr.port()));
            let listen = addr.to_string();
            let mut args = vec!["trust", "serve", "--data-dir", data, "--listen", &listen, "--allow-sim"];
            args.extend_from_slice(extra);
            let child =
                command(&args).stdout(Stdio::null()).stderr(File::create(&log).unwrap()).spawn().expect("run capsa");
            let mut server = Self { child, url: format!("http://{addr}"), log };
            let deadline = Instant::now() + LIMIT;
            while Instant::now() < deadline {
                if server.child.try_wait().unwrap().is_some() {
                    break;
                }
                if healthy(addr) {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let log = server.log();
            assert!(log.contains("cannot listen"), "the server did not start:\n{log}");
        }
        panic!("no free port for the server after 5 tries");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: `Child::kill` sends it on Unix.
    fn kill(&mut self) -> ExitStatus {
        self.child.kill().unwrap();
        self.child.wait().unwrap()
    }

    /// SIGTERM, then wait for the graceful shutdown.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        wait_for(&mut self.child, LIMIT).unwrap_or_else(|| panic!("the server ignored SIGTERM:\n{}", self.log()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin_token(data: &str) -> String {
    std::fs::read_to_string(Path::new(data).join("admin.token")).unwrap().trim().to_owned()
}

/// A release policy for sim tokens from `authority` with `host_data`.
fn policy(authority: &str, host_data: [u8; 32]) -> Value {
    json!({
        "version": "1.0.0",
        "anyOf": [{
            "authority": authority,
            "allOf": [
                {"claim": "x-ms-attestation-type", "equals": "sim"},
                {"claim": "x-ms-sevsnpvm-hostdata", "equals": hex::encode(host_data)},
            ],
        }],
    })
}

/// The 32 bytes the durability test imports as key `name`.
fn material(name: &str) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes()).as_ref().to_vec()
}

/// Writer `writer` creates keys `k-<writer>-<n>` until the server stops
/// answering, recording each name the server acknowledged (201); returns
/// the error that stopped it.
async fn create_keys(admin: Client, writer: usize, acknowledged: Arc<Mutex<Vec<String>>>) -> ClientError {
    for n in 0u64.. {
        let name = format!("k-{writer}-{n}");
        let request = json!({
            "name": name,
            "kty": "oct",
            "bits": 256,
            "value": URL_SAFE_NO_PAD.encode(material(&name)),
            "release_policy": policy(&format!("{ISSUER}/sim"), HOST_DATA),
        });
        match admin.create_key(&request).await {
            Ok(info) => {
                assert_eq!(info.name, name);
                acknowledged.lock().unwrap().push(name);
            }
            Err(e) => return e,
        }
    }
    unreachable!()
}

/// A token for a workload holding `key`, from sim evidence with `HOST_DATA`.
async fn sim_token(server: &Client, sim: &SimPlatform, key: &RuntimeKey) -> String {
    let runtime = key.runtime_data().unwrap();
    let report_data = client::report_data_for(&runtime, None).unwrap();
    let report = sim
        .report(&ReportRequest {
            measurement: MEASUREMENT,
            host_data: HOST_DATA,
            report_data,
            policy_debug: false,
            vmpl: 0,
        })
        .unwrap();
    let chain = sim.vcek_pem() + &sim.chain_pem();
    let request = client::snp_attest_request(&report, chain.as_bytes(), &runtime, None);
    server.attest(EvidenceKind::SevSnpVm, None, &request).await.unwrap()
}

#[test]
fn acknowledged_keys_survive_sigkill() {
    let dir = TempDir::new("sigkill");
    let data = dir.arg("data");
    let config = dir.arg("trust.toml");
    std::fs::write(&config, format!("issuer = \"{ISSUER}\"\n")).unwrap();
    let sim = SimPlatform::init(&dir.0.join("sim")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let mut server = Server::start(&data, &dir.0, &["--config", &config]);
    let admin = Client::new(&server.url).unwrap().with_admin_token(admin_token(&data));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> =
        (0..8).map(|writer| rt.spawn(create_keys(admin.clone(), writer, Arc::clone(&acknowledged)))).collect();

    // Kill after a second of writing (and hundreds acknowledged), with all
    // eight writers mid-request.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1)
        || (acknowledged.lock().unwrap().len() < 200 && started.elapsed() < Duration::from_secs(10))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.kill().signal(), Some(9), "{}", server.log());
    for writer in writers {
        let stopped_by = rt.block_on(writer).unwrap();
        assert!(matches!(stopped_by, ClientError::Unreachable { .. }), "a writer was refused: {stopped_by}");
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 100, "only {} keys acknowledged before the kill", acknowledged.len());

    // The store opens cleanly on restart and holds every acknowledged key.
    let mut server = Server::start(&data, &dir.0, &["--config", &config]);
    let admin = Client::new(&server.url).unwrap().with_admin_token(admin_token(&data));
    let present: HashSet<String> = rt.block_on(admin.list_keys()).unwrap().into_iter().map(|k| k.name).collect();
    let lost: Vec<&String> = acknowledged.iter().filter(|name| !present.contains(*name)).collect();
    assert!(lost.is_empty(), "{} acknowledged keys lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);

    // Each is usable: release 20 spread over the run and the last 4
    // acknowledged, and compare with what was imported.
    let step = (acknowledged.len() / 20).max(1);
    let mut sample: Vec<&String> = acknowledged.iter().step_by(step).collect();
    sample.extend(acknowledged.iter().rev().take(4));
    sample.sort();
    sample.dedup();
    let workload = Client::new(&server.url).unwrap();
    let key = RuntimeKey::generate().unwrap();
    rt.block_on(async {
        let token = sim_token(&workload, &sim, &key).await;
        let server_keys = workload.jwks(false).await.unwrap();
        for name in &sample {
            let answer = workload.release(name, None, &token).await.unwrap();
            let released = client::open_release(&answer, &server_keys, key.private()).unwrap();
            assert_eq!(released.material.as_slice(), material(name).as_slice(), "{name}");
        }
    });
    eprintln!(
        "acknowledged {} keys before SIGKILL; {} present after restart ({} unacknowledged); released {} of them intact",
        acknowledged.len(),
        present.len(),
        present.len() - acknowledged.len(),
        sample.len()
    );

    // A graceful stop, then the audit log (written in the same
    // transactions) verifies offline.
    assert!(server.terminate().success(), "{}", server.log());
    let o = capsa(&["trust", "audit", "verify", "--data-dir", &data]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("audit log intact"), "{}", stdout(&o));
}

#[test]
fn cli_releases_an_imported_key_and_exits_1_on_refusal_2_on_bad_input() {
    let dir = TempDir::new("cli");
    let (data, sim, certs) = (dir.arg("data"), dir.arg("sim"), dir.arg("certs"));
    assert_exit(&capsa(&["sim", "init", "--dir", &sim]), 0);
    assert_exit(&capsa(&["sim", "certs", "--dir", &sim, "--out", &certs]), 0);
    let (vcek, chain) = (format!("{certs}/vcek.pem"), format!("{certs}/chain.pem"));
    let server = Server::start(&data, &dir.0, &[]);
    let url = server.url.as_str();
    let admin_token = format!("{data}/admin.token");

    let value = dir.arg("value.bin");
    std::fs::write(&value, [0x5a; 32]).unwrap();
    let policy_file = dir.arg("policy.json");
    std::fs::write(&policy_file, policy(&format!("{url}/sim"), HOST_DATA).to_string()).unwrap();
    let create = |name: &str, policy: &str, token_file: &str| {
        capsa(&[
            "trust",
            "key",
            "create",
            "--name",
            name,
            "--policy",
            policy,
            "--value-file",
            &value,
            "--server",
            url,
            "--admin-token-file",
            token_file,
        ])
    };
    let o = create("db", &policy_file, &admin_token);
    assert_exit(&o, 0);
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["name"], "db");

    // The workload: a runtime key, sim evidence binding it, a token.
    let runtime_key = dir.arg("runtime.key");
    let o = capsa(&["trust", "runtime-key", "--out", &runtime_key]);
    assert_exit(&o, 0);
    let report_data = stdout(&o).trim().to_owned();
    assert_eq!(report_data.len(), 128, "{report_data}");
    let attest = |host_data: [u8; 32], token: &str| {
        let report = dir.arg("report.bin");
        let measurement = hex::encode(MEASUREMENT);
        let host_data = hex::encode(host_data);
        assert_exit(
            &capsa(&[
                "sim",
                "report",
                "--dir",
                &sim,
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
        let o = capsa(&[
            "trust",
            "attest",
            &report,
            "--tee",
            "snp",
            "--vcek",
            &vcek,
            "--chain",
            &chain,
            "--runtime-key",
            &runtime_key,
            "--out",
            token,
            "--server",
            url,
        ]);
        assert_exit(&o, 0);
    };
    let release = |token: &str, out: &str| {
        capsa(&[
            "trust",
            "release",
            "--key",
            "db",
            "--token",
            token,
            "--runtime-key",
            &runtime_key,
            "--out",
            out,
            "--server",
            url,
        ])
    };

    // Released to the matching workload, into a file only its owner reads.
    let (token, released) = (dir.arg("token"), dir.arg("released.bin"));
    attest(HOST_DATA, &token);
    assert_exit(&release(&token, &released), 0);
    assert_eq!(std::fs::read(&released).unwrap(), [0x5a; 32]);
    assert_eq!(std::fs::metadata(&released).unwrap().permissions().mode() & 0o777, 0o600);

    // Other host data: refused (1), naming the failing clause; nothing written.
    let (other_token, other_out) = (dir.arg("other-token"), dir.arg("other.bin"));
    attest(OTHER_HOST_DATA, &other_token);
    let o = release(&other_token, &other_out);
    assert_exit(&o, 1);
    for mention in ["403", "anyOf[0].allOf[1]", "x-ms-sevsnpvm-hostdata"] {
        assert!(stderr(&o).contains(mention), "{:?} does not mention {mention:?}", stderr(&o));
    }
    assert!(!Path::new(&other_out).exists());

    // A wrong admin token is refused by the server (401: 1); a missing
    // token file is the caller's mistake (2).
    let wrong_token = dir.arg("wrong.token");
    std::fs::write(&wrong_token, "0".repeat(64)).unwrap();
    let o = create("db2", &policy_file, &wrong_token);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    let o = create("db2", &policy_file, &dir.arg("no-such.token"));
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("cannot read the admin token"), "{}", stderr(&o));

    // A policy the server rejects (400) and one that is not JSON: 2.
    let bad_policy = dir.arg("bad-policy.json");
    std::fs::write(&bad_policy, r#"{"version": "9.9.9", "anyOf": []}"#).unwrap();
    let o = create("db2", &bad_policy, &admin_token);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("400") && stderr(&o).contains("version"), "{}", stderr(&o));
    std::fs::write(&bad_policy, "anyOf: [").unwrap();
    let o = create("db2", &bad_policy, &admin_token);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("not JSON"), "{}", stderr(&o));

    // The audit log, asked of the running server.
    let o = capsa(&["trust", "audit", "verify", "--server", url, "--admin-token-file", &admin_token]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("audit log intact"), "{}", stdout(&o));
}

#[test]
fn serve_exits_2_naming_a_config_file_that_does_not_parse() {
    let dir = TempDir::new("badconfig");
    let config = dir.arg("trust.toml");
    for text in ["issuer = [\n", "isuer = \"http://capsa.test\"\n"] {
        std::fs::write(&config, text).unwrap();
        let o =
            capsa(&["trust", "serve", "--data-dir", &dir.arg("data"), "--listen", "127.0.0.1:0", "--config", &config]);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains(&config), "{:?} does not name {config}", stderr(&o));
    }
}
