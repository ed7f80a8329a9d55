//! The trust service a test runs: `capsa trust serve --allow-sim` on a
//! free port, and keys with release policies for sim sandboxes.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::capsa;

/// `capsa trust serve --allow-sim` on a free port; killed when dropped.
pub struct Trust {
    child: Child,
    /// Its base URL.
    pub url: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The admin token file.
    pub admin_token: PathBuf,
}

impl Trust {
    pub fn start(home: &Path) -> Self {
        Self::start_with(home, &[])
    }

    /// Serves HTTPS with a certificate for `localhost` issued by a test CA
    /// that openssl makes; returns the server and the CA (PEM).
    pub fn start_tls(home: &Path) -> (Self, String) {
        let file = |name: &str| home.join(name).display().to_string();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let (ca, ca_key, csr, cert, key, ext) = (
            file("ca.pem"),
            file("ca.key"),
            file("leaf.csr"),
            file("tls-cert.pem"),
            file("tls-key.pem"),
            file("leaf.ext"),
        );
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-days", "2", "-subj", "/CN=capsa test CA", "-keyout", &ca_key, "-out", &ca],
            ]
            .concat(),
        );
        openssl(&[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", &key, "-out", &csr]].concat());
        std::fs::write(&ext, "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        let server = Self::start_with(home, &["--tls-cert", &cert, "--tls-key", &key]);
        (server, std::fs::read_to_string(ca).unwrap())
    }

    pub fn start_with(home: &Path, extra: &[&str]) -> Self {
        let data = home.join("trust");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = capsa(home)
            .args([
                "trust",
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &addr.to_string(),
                "--allow-sim",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the trust service did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let scheme = if extra.is_empty() { "http" } else { "https" };
        Self { child, url: format!("{scheme}://{addr}"), port, admin_token: data.join("admin.token") }
    }

    /// [`Trust::create_key`] over HTTPS, trusting `ca`: through the
    /// client library, since the CLI trusts the system roots only.
    pub fn create_key_tls(&self, ca: &str, name: &str, value: &[u8], host_data: &str, measurement: &str) {
        let token = std::fs::read_to_string(&self.admin_token).unwrap();
        let url = format!("https://localhost:{}", self.port);
        let client = capsa_trust::client::Client::with_ca(&url, ca.as_bytes()).unwrap().with_admin_token(token.trim());
        let body = json!({"name": name, "kty": "oct", "bits": 256, "immutable": false,
            "value": URL_SAFE_NO_PAD.encode(value), "release_policy": self.release_policy(host_data, measurement)});
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(client.create_key(&body)).unwrap();
    }

    pub fn release_policy(&self, host_data: &str, measurement: &str) -> serde_json::Value {
        json!({"version": "1.0.0", "anyOf": [{"authority": format!("{}/sim", self.url), "allOf": [
            {"claim": "x-ms-sevsnpvm-hostdata", "equals": host_data},
            {"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": measurement},
            {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": false}]}]})
    }

    /// Creates key `name` holding `value`, released only to the sim
    /// issuer's tokens for HOST_DATA `host_data` and MEASUREMENT
    /// `measurement`.
    pub fn create_key(&self, home: &Path, name: &str, value: &[u8], host_data: &str, measurement: &str) {
        let policy = self.release_policy(host_data, measurement);
        let policy_file = home.join(format!("{name}.policy.json"));
        std::fs::write(&policy_file, policy.to_string()).unwrap();
        let value_file = home.join(format!("{name}.key"));
        std::fs::write(&value_file, value).unwrap();
        let out = capsa(home)
            .env("CAPSA_TRUST_URL", &self.url)
            .args(["trust", "key", "create", "--name", name, "--policy", policy_file.to_str().unwrap()])
            .args([
                "--value-file",
                value_file.to_str().unwrap(),
                "--admin-token-file",
                self.admin_token.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Trust {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
