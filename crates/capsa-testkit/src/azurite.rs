//! Azurite (npm's `azurite`, the Azure Storage emulator) on 127.0.0.1, for
//! tests of images in Azure Blob storage: a random free port, its own
//! storage, killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::{TempDir, have};

/// Azurite's built-in account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's built-in account key, published in its docs (not a secret).
pub const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The API version sent with our own requests (Azurite runs with
/// `--skipApiVersionCheck`, so object_store's newer versions pass too).
const API_VERSION: &str = "2021-12-02";

/// A running `azurite-blob`.
pub struct Azurite {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: TempDir,
}

impl Azurite {
    /// Starts Azurite's blob service, or returns None (the test skips, or
    /// fails under CAPSA_REQUIRE_TOOLS) when `azurite-blob` is not installed.
    pub fn start() -> Option<Self> {
        if !have("azurite-blob") {
            return None;
        }
        for _ in 0..3 {
            let dir = TempDir::new("azurite");
            // Pick a free port; Azurite binds it a moment later.
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            std::fs::create_dir_all(dir.join("data")).unwrap();
            let log = std::fs::File::create(dir.join("azurite.log")).unwrap();
            let child = Command::new("azurite-blob")
                .args(["--disableTelemetry", "--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(dir.join("data"))
                .args(["--skipApiVersionCheck", "--silent"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("azurite-blob starts");
            let mut azurite = Self { child: Some(child), addr, dir };
            if azurite.wait_ready() {
                return Some(azurite);
            }
            eprintln!("azurite did not come up:\n{}", azurite.log());
            azurite.stop();
        }
        panic!("azurite-blob did not start");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            // Any HTTP answer will do (an unsigned request is refused).
            if let Some(resp) = self.request("GET", &format!("/{ACCOUNT}?comp=list"), &[]) {
                if resp.starts_with("HTTP/1.1 ") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// The account's name.
    pub fn account(&self) -> &'static str {
        ACCOUNT
    }

    /// The account's key.
    pub fn key(&self) -> &'static str {
        KEY
    }

    /// The blob service: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The account's URL, path-style: `http://127.0.0.1:PORT/devstoreaccount1`.
    pub fn account_url(&self) -> String {
        format!("http://{}/{ACCOUNT}", self.addr)
    }

    /// A path-style URL of a prefix in a container:
    /// `http://127.0.0.1:PORT/devstoreaccount1/CONTAINER/PREFIX`.
    pub fn url(&self, container: &str, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("{}/{container}", self.account_url())
        } else {
            format!("{}/{container}/{prefix}", self.account_url())
        }
    }

    /// What a child process needs to reach this Azurite, either by a
    /// path-style URL or as `az://CONTAINER/PREFIX` (object_store's emulator
    /// settings).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", KEY.to_string()),
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_string()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates a container (object_store cannot): one Create Container
    /// request signed with the account's shared key.
    pub fn create_container(&self, name: &str) {
        let date = http_date(SystemTime::now());
        let path = format!("/{ACCOUNT}/{name}");
        // https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key:
        // the verb, eleven standard headers (all empty here; Content-Length
        // is empty when zero), the x-ms- headers sorted, then the resource:
        // the account, the URL's path (which path-style URLs start with the
        // account again), and the query parameters, sorted.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n/{ACCOUNT}{path}\nrestype:container"
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &BASE64.decode(KEY).unwrap());
        let signature = BASE64.encode(hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let headers = [
            ("x-ms-date", date),
            ("x-ms-version", API_VERSION.to_string()),
            ("Content-Length", "0".to_string()),
            ("Authorization", format!("SharedKey {ACCOUNT}:{signature}")),
        ];
        let resp = self
            .request("PUT", &format!("{path}?restype=container"), &headers)
            .unwrap_or_else(|| panic!("azurite at {} did not answer", self.addr));
        assert!(resp.starts_with("HTTP/1.1 201"), "creating container {name} failed:\n{resp}\n{}", self.log());
    }

    /// One HTTP/1.1 request; the whole response, or None if the connection
    /// failed.
    fn request(&self, method: &str, target: &str, headers: &[(&str, String)]) -> Option<String> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        (!resp.is_empty()).then(|| String::from_utf8_lossy(&resp).into_owned())
    }

    /// Azurite's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("azurite.log")).unwrap_or_default()
    }

    /// Kills Azurite and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP date (RFC 7231's IMF-fixdate): `Tue, 15 Nov 1994 08:12:31 GMT`.
pub fn http_date(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, min, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days to a civil date (Howard Hinnant's algorithm), for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {day:02} {} {year} {hour:02}:{min:02}:{sec:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(784_887_151)), "Tue, 15 Nov 1994 08:12:31 GMT");
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "Thu, 29 Feb 2024 12:34:56 GMT");
    }

    #[test]
    fn starts_and_creates_containers() {
        let Some(azurite) = Azurite::start() else { return };
        azurite.create_container("one");
        let dup = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| azurite.create_container("one")));
        assert!(dup.is_err(), "a second create of the same container is refused (409), so the first was real");
        assert!(azurite.url("one", "/a/b/").ends_with("/devstoreaccount1/one/a/b"));
    }
}
