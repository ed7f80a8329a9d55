//! Encrypted filesystems in the sandbox: the volumes the initdata lists,
//! mounted before any container starts.
//!
//! For each volume the agent releases the image's key exactly as the
//! workload API releases keys (attestation bound to a fresh wrapping key,
//! then the broker's release policy), opens the image through the port the
//! launcher forwards to its object store, and mounts it at
//! `/run/capsa/encfs/<name>`, where the policy lets containers bind it. The
//! host carries only ciphertext: every block is checked on read, and the key
//! exists only in guest memory.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use capsa_encfs::luks::{LuksLocation, LuksVolume};
use capsa_encfs::mount::Mounted;
use capsa_encfs::{Image, MasterKey, OpenOptions, Volume, remote};
use capsa_policy::document::{EncfsVolume, SandboxSettings};

use crate::service::WorkloadService;

/// Where the images' FUSE devices are mounted (private to the agent).
const DEVICES: &str = "/run/capsa/encfs-devices";
/// A commit at least this often while writes wait; fsync commits at once.
const WRITEBACK: Duration = Duration::from_secs(2);

/// A mounted volume; unmounting commits what is still dirty.
pub struct MountedVolume {
    name: String,
    /// The capsa image, for its writeback; none for a LUKS2 volume.
    image: Option<Arc<Image>>,
    mounted: Option<Mounted>,
    writeback: Option<JoinHandle<()>>,
}

/// Why a volume could not be mounted: a refusal (the broker would not
/// release the key to this sandbox) or a failure.
#[derive(Debug)]
pub struct VolumeError {
    /// The broker refused (an HTTP 4xx from it).
    pub refused: bool,
    /// What happened, naming the volume.
    pub message: String,
}

/// Mounts every volume of `settings`, in order; on any failure those already
/// mounted are unmounted again and nothing stays mounted.
pub fn mount_all(service: &WorkloadService, settings: &SandboxSettings) -> Result<Vec<MountedVolume>, VolumeError> {
    let mut mounted = Vec::new();
    for volume in &settings.encfs {
        match mount_one(service, settings, volume) {
            Ok(v) => {
                eprintln!(
                    "capsa-agent: encfs volume {} mounted at {}{}",
                    volume.name,
                    volume.mount_point(),
                    if volume.read_only { " (read-only)" } else { "" }
                );
                mounted.push(v);
            }
            Err(e) => {
                for v in mounted {
                    v.unmount();
                }
                return Err(e);
            }
        }
    }
    Ok(mounted)
}

fn mount_one(
    service: &WorkloadService,
    settings: &SandboxSettings,
    volume: &EncfsVolume,
) -> Result<MountedVolume, VolumeError> {
    let failed =
        |message: String| VolumeError { refused: false, message: format!("encfs volume {}: {message}", volume.name) };
    let trust = settings
        .trust
        .first()
        .ok_or_else(|| failed("the initdata names no trust service to release its key".into()))?;
    let released = service.release(&trust.url, &trust.url, &volume.key).map_err(|e| VolumeError {
        refused: e.status / 100 == 4,
        message: format!(
            "encfs volume {}: the key {} was not released ({}): {}",
            volume.name, volume.key, e.status, e.message
        ),
    })?;
    let address = volume.address().map_err(|e| failed(format!("{:?} {e}", volume.url)))?;
    let local = service
        .forwarded(&address.endpoint())
        .ok_or_else(|| failed(format!("no forwarded port for {}: the launcher did not open it", address.endpoint())))?;
    if address.tls {
        return Err(failed(format!(
            "{} is https; the guest reaches object stores over plain http through the launcher's forwarded port (the \
             image is encrypted and authenticated end to end, so the transport needs no TLS): use http://",
            volume.url
        )));
    }
    let url = local_url(&volume.url, &local.to_string());
    let target = volume.mount_point();
    std::fs::create_dir_all(&target).map_err(|e| failed(format!("{target}: {e}")))?;

    // An image made with Azure's encrypted-filesystem recipe (one LUKS2
    // blob): read-only, the released key file's bytes as its passphrase.
    if let Some(luks) = LuksLocation::detect(&url) {
        if !volume.read_only {
            return Err(failed(format!(
                "{} is a LUKS2 image, which capsa mounts read-only (it has no integrity protection to write under): \
                 mark the volume readOnly",
                volume.url
            )));
        }
        let luks = LuksVolume::open(luks.store, &luks.object, &released.material, luks.size)
            .map_err(|e| failed(format!("{}: {e}", volume.url)))?;
        drop(released);
        let luks: Arc<dyn Volume> = Arc::new(luks);
        let mounted = Mounted::mount(luks, Path::new(&target), Path::new(DEVICES))
            .map_err(|e| failed(format!("mounting at {target}: {e}")))?;
        return Ok(MountedVolume { name: volume.name.clone(), image: None, mounted: Some(mounted), writeback: None });
    }

    let key = MasterKey::from_bytes(&released.material).map_err(|e| failed(format!("the key {}: {e}", volume.key)))?;
    drop(released);
    let store = remote::open(&url).map_err(|e| failed(format!("{}: {e}", volume.url)))?;
    let options = OpenOptions {
        read_only: volume.read_only,
        // Guest memory is the pod's: modest caches, commits well before
        // the dirty set could crowd the workload.
        cache_blocks: 4096,
        dirty_limit: 32 << 20,
        read_around: 16,
        ..OpenOptions::default()
    };
    let image = Arc::new(Image::open(store, &key, options).map_err(|e| failed(e.to_string()))?);
    drop(key);
    let writeback = if volume.read_only {
        None
    } else {
        Some(image.start_writeback(WRITEBACK).map_err(|e| failed(format!("the writeback thread: {e}")))?)
    };
    let mounted = Mounted::mount(image.clone(), Path::new(&target), Path::new(DEVICES)).map_err(|e| {
        image.stop_writeback();
        failed(format!("mounting at {target}: {e}"))
    })?;
    Ok(MountedVolume { name: volume.name.clone(), image: Some(image), mounted: Some(mounted), writeback })
}

/// The volume's URL with its host and port replaced by the guest's
/// forwarded port: the path (account, container, prefix) is unchanged.
fn local_url(url: &str, local: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let path = rest.split_once('/').map_or("", |(_, path)| path);
    format!("{scheme}://{local}/{path}")
}

impl MountedVolume {
    /// Commits what is dirty and unmounts.
    pub fn unmount(mut self) {
        if let Some(image) = &self.image {
            image.stop_writeback();
        }
        if let Some(mounted) = self.mounted.take() {
            match mounted.unmount() {
                Ok(()) => eprintln!(
                    "capsa-agent: encfs volume {} unmounted{}",
                    self.name,
                    self.image.as_ref().map(|i| format!(" (generation {})", i.generation())).unwrap_or_default()
                ),
                Err(e) => eprintln!("capsa-agent: encfs volume {}: unmounting: {e}", self.name),
            }
        }
        if let Some(handle) = self.writeback.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_their_path_and_go_to_the_forwarded_port() {
        assert_eq!(
            local_url("http://127.0.0.1:10000/devstoreaccount1/images/data", "127.0.0.1:39001"),
            "http://127.0.0.1:39001/devstoreaccount1/images/data"
        );
        assert_eq!(local_url("http://store.example/bucket", "127.0.0.1:5"), "http://127.0.0.1:5/bucket");
    }
}
