//! Layer hashing while the bytes stream past: the compressed digest, and the
//! `diff_id` of the decompressed tar. Nothing is written to disk. Also the
//! optional progress bars.

use std::io::{self, IsTerminal, Write};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use aws_lc_rs::digest::{Context, SHA256};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::manifest::Digest;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members, as pigz writes).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares; `None` for media types
    /// that are not (supported) layers, e.g. encrypted ones.
    pub(crate) fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// Recognizes the compression from a blob's first bytes (docker-archive
    /// layers carry no media type).
    pub(crate) fn sniff(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// Hashes the uncompressed stream.
struct DiffHash {
    ctx: Context,
    len: u64,
}

impl Write for DiffHash {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ctx.update(buf);
        self.len = self.len.saturating_add(buf.len() as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Sink {
    /// Only the compressed digest is wanted (the diff_id is already known).
    DigestOnly,
    Plain(DiffHash),
    Gzip(Box<flate2::write::MultiGzDecoder<DiffHash>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, DiffHash>>),
}

/// Why hashing stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashFailure {
    /// More bytes arrived than the descriptor's size.
    TooLong {
        /// The size the descriptor gives.
        limit: u64,
    },
}

/// The digests of one layer.
#[derive(Debug, Clone)]
pub(crate) struct LayerDigests {
    /// Digest of the bytes as stored.
    pub(crate) digest: Digest,
    /// Digest of the decompressed tar; `None` in digest-only mode or when
    /// decompression failed.
    pub(crate) diff_id: Option<Digest>,
    /// Why decompression failed, if it did. Callers check `digest` first: a
    /// blob that does not match its digest was tampered with, which is the
    /// more useful diagnosis.
    pub(crate) decode_error: Option<String>,
    /// Bytes as stored.
    pub(crate) size: u64,
}

/// Consumes a layer blob, as a [`Write`] or tokio `AsyncWrite`, hashing it
/// and its decompressed form.
pub(crate) struct LayerHasher {
    compressed: Context,
    size: u64,
    limit: u64,
    sink: Sink,
    failure: Option<HashFailure>,
    decode_error: Option<String>,
    progress: Option<ProgressBar>,
}

impl LayerHasher {
    /// A hasher for a blob of at most `limit` bytes, compressed as given;
    /// `compression: None` hashes the stored bytes only.
    pub(crate) fn new(compression: Option<Compression>, limit: u64, progress: Option<ProgressBar>) -> io::Result<Self> {
        let diff = || DiffHash { ctx: Context::new(&SHA256), len: 0 };
        let sink = match compression {
            None => Sink::DigestOnly,
            Some(Compression::None) => Sink::Plain(diff()),
            Some(Compression::Gzip) => Sink::Gzip(Box::new(flate2::write::MultiGzDecoder::new(diff()))),
            Some(Compression::Zstd) => Sink::Zstd(Box::new(zstd::stream::write::Decoder::new(diff())?)),
        };
        Ok(Self {
            compressed: Context::new(&SHA256),
            size: 0,
            limit,
            sink,
            failure: None,
            decode_error: None,
            progress,
        })
    }

    /// Why the last write failed, if it did for a reason of ours.
    pub(crate) fn failure(&self) -> Option<&HashFailure> {
        self.failure.as_ref()
    }

    /// Finishes decompression and returns the digests.
    pub(crate) fn finish(self) -> Result<LayerDigests, HashFailure> {
        if let Some(f) = self.failure {
            return Err(f);
        }
        let mut decode_error = self.decode_error;
        let diff = match self.sink {
            Sink::DigestOnly => None,
            Sink::Plain(d) => Some(d),
            Sink::Gzip(d) => d.finish().map_err(|e| decode_error = Some(e.to_string())).ok(),
            Sink::Zstd(mut d) => match d.flush() {
                Ok(()) => Some(d.into_inner()),
                Err(e) => {
                    decode_error = Some(e.to_string());
                    None
                }
            },
        };
        if let Some(p) = &self.progress {
            p.finish_and_clear();
        }
        Ok(LayerDigests {
            digest: Digest::finish(self.compressed),
            diff_id: diff.filter(|_| decode_error.is_none()).map(|d| Digest::finish(d.ctx)),
            decode_error,
            size: self.size,
        })
    }

    fn consume(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.failure.is_some() {
            return Err(io::Error::other("layer is longer than its descriptor says"));
        }
        let new_size = self.size.saturating_add(buf.len() as u64);
        if new_size > self.limit {
            self.failure = Some(HashFailure::TooLong { limit: self.limit });
            return Err(io::Error::other("layer is longer than its descriptor says"));
        }
        self.compressed.update(buf);
        let result = match &mut self.sink {
            Sink::DigestOnly => Ok(()),
            Sink::Plain(d) => d.write_all(buf),
            Sink::Gzip(d) => d.write_all(buf),
            Sink::Zstd(d) => d.write_all(buf),
        };
        if let Err(e) = result {
            // Keep digesting the stored bytes: whether they match their
            // digest decides which error the caller reports.
            self.decode_error = Some(e.to_string());
            self.sink = Sink::DigestOnly;
        }
        self.size = new_size;
        if let Some(p) = &self.progress {
            p.inc(buf.len() as u64);
        }
        Ok(())
    }
}

impl Write for LayerHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.consume(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl tokio::io::AsyncWrite for LayerHasher {
    fn poll_write(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Hashing and decompressing a network chunk (at most some tens of
        // KiB) is cheap enough to do inline.
        Poll::Ready(self.get_mut().consume(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Collects a small blob (manifest, config) in memory, refusing more than
/// `limit` bytes.
pub(crate) struct LimitedBuf {
    /// The bytes so far.
    pub(crate) bytes: Vec<u8>,
    limit: u64,
    /// Set when more than `limit` bytes were offered.
    pub(crate) overflowed: bool,
}

impl LimitedBuf {
    /// An empty buffer that accepts at most `limit` bytes.
    pub(crate) fn new(limit: u64) -> Self {
        Self { bytes: Vec::new(), limit, overflowed: false }
    }
}

impl tokio::io::AsyncWrite for LimitedBuf {
    fn poll_write(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if (this.bytes.len() as u64).saturating_add(buf.len() as u64) > this.limit {
            this.overflowed = true;
            return Poll::Ready(Err(io::Error::other("blob exceeds its size limit")));
        }
        this.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Progress bars on stderr, only when asked for and stderr is a terminal.
pub(crate) struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Progress display if `enabled` and stderr is a terminal.
    pub(crate) fn new(enabled: bool) -> Self {
        Self { multi: (enabled && io::stderr().is_terminal()).then(MultiProgress::new) }
    }

    /// A byte-counting bar of `len` bytes labelled `message`.
    pub(crate) fn bar(&self, len: u64, message: String) -> Option<ProgressBar> {
        let multi = self.multi.as_ref()?;
        let bar = multi.add(ProgressBar::new(len));
        if let Ok(style) =
            ProgressStyle::with_template("{msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message);
        Some(bar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(compression: Compression, blob: &[u8]) -> Result<LayerDigests, HashFailure> {
        // (decode errors are reported in LayerDigests, not as failures)
        let mut h = LayerHasher::new(Some(compression), blob.len() as u64, None).unwrap();
        // Feed in odd-sized chunks, as a network would.
        for chunk in blob.chunks(7) {
            if h.write_all(chunk).is_err() {
                break;
            }
        }
        h.finish()
    }

    #[test]
    fn diff_ids_of_each_compression() {
        let tar = b"not really a tar, but the digest does not care".repeat(100);
        let want = Digest::of(&tar);

        let plain = hash(Compression::None, &tar).unwrap();
        assert_eq!(plain.diff_id.as_ref(), Some(&want));
        assert_eq!(plain.digest, want);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let d = hash(Compression::Gzip, &gz).unwrap();
        assert_eq!(d.diff_id.as_ref(), Some(&want));
        assert_eq!(d.digest, Digest::of(&gz));
        assert_eq!(d.size, gz.len() as u64);

        // Two gzip members, as pigz may write.
        let (a, b) = tar.split_at(1000);
        let mut two = Vec::new();
        for part in [a, b] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            two.extend(e.finish().unwrap());
        }
        assert_eq!(hash(Compression::Gzip, &two).unwrap().diff_id.as_ref(), Some(&want));

        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        assert_eq!(hash(Compression::Zstd, &zst).unwrap().diff_id.as_ref(), Some(&want));

        assert_eq!(Compression::sniff(&gz), Compression::Gzip);
        assert_eq!(Compression::sniff(&zst), Compression::Zstd);
        assert_eq!(Compression::sniff(&tar), Compression::None);
    }

    #[test]
    fn refuses_overlong_and_corrupt_streams() {
        let mut h = LayerHasher::new(Some(Compression::None), 3, None).unwrap();
        assert!(h.write_all(b"abcd").is_err());
        assert_eq!(h.finish().unwrap_err(), HashFailure::TooLong { limit: 3 });

        let garbage = b"\x1f\x8b this is not deflate data at all".to_vec();
        let d = hash(Compression::Gzip, &garbage).unwrap();
        assert!(d.decode_error.is_some() && d.diff_id.is_none());
        // The stored bytes are still digested in full.
        assert_eq!(d.digest, Digest::of(&garbage));
        assert_eq!(d.size, garbage.len() as u64);
        // A gzip stream cut short fails at the end.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"some data").unwrap();
        let gz = gz.finish().unwrap();
        let cut = hash(Compression::Gzip, &gz[..gz.len() - 4]).unwrap();
        assert!(cut.decode_error.is_some(), "{cut:?}");
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar"), Some(Compression::None));
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"), None);
    }
}
