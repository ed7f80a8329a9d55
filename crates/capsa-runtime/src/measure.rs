//! The launch digest of a sandbox: the 48 bytes `capsa measure` prints and
//! the sim platform signs as a report's MEASUREMENT.
//!
//! A relying party pins this value, so it is a pure function of the three
//! things the launcher boots — kernel, initrd, command line — written down
//! here byte for byte so that anyone can recompute it without capsa.
//!
//! # What is computed
//!
//! capsa models AMD SEV-SNP *measured direct boot* (QEMU `-kernel`,
//! `-initrd`, `-append` with `kernel-hashes=on`), minus the firmware:
//!
//! 1. [`SevHashes`]: QEMU's SEV hashes table, exactly as QEMU builds it. A
//!    header (GUID `9438d606-4f22-4cc9-b479-a793d411fd21`, `u16` length
//!    168) and three entries `{GUID, u16 length 50, SHA-256}` in the order
//!    command line (`97d02dd8-…`, hash of the string *plus its terminating
//!    NUL*, as QEMU hashes the `-append` C string), initrd (`44baf731-…`,
//!    hash of the file, of nothing if there is none), kernel (`4de79437-…`,
//!    hash of the whole bzImage file: QEMU hashes setup ‖ kernel, which for
//!    SEV guests it leaves unpatched). GUIDs are in UEFI's mixed-endian
//!    encoding, integers little-endian, and the table is zero-padded to a
//!    16-byte multiple (176 bytes).
//! 2. The hashes page: 4 KiB of zeros with the table at
//!    [`HASHES_TABLE_OFFSET`], the page at guest-physical address
//!    [`HASHES_PAGE_GPA`]. These are where OVMF's AmdSev build
//!    (`OvmfPkg/AmdSev/AmdSevX64.fdf`) reserves `PcdQemuHashTableBase`:
//!    offset 0x10C00 into its MEMFD at 0x800000, i.e. GPA 0x810C00, inside
//!    the page its `SNP_KERNEL_HASHES` metadata section names.
//! 3. The SEV-SNP launch digest (SNP firmware ABI, `SNP_LAUNCH_UPDATE`,
//!    `PAGE_INFO`): starting from 48 zero bytes, each page folds in as
//!    `digest = SHA-384(PAGE_INFO)` where `PAGE_INFO` (0x70 bytes) is the
//!    current digest ‖ SHA-384 of the page ‖ `u16` length 0x70 ‖ page type
//!    ‖ IMI flag ‖ VMPL3, VMPL2, VMPL1 permissions ‖ a reserved byte ‖ `u64`
//!    GPA. capsa's digest is this chain over one page: the hashes page, as a
//!    NORMAL page.
//!
//! # What real hardware adds
//!
//! On SEV-SNP the launch digest also covers, before the hashes page, every
//! page of the OVMF AmdSev image and the pages its SEV metadata sections
//! describe (zero, secrets, CPUID pages), and after it one VMSA page per
//! vCPU. Predicting that value needs: an OVMF AmdSev build (Debian 12's
//! `ovmf` package has none), the vCPU count and CPU type (they shape the
//! VMSA pages), the guest features (SEV_FEATURES) and the VMM type. The
//! chain itself, the hashes table and its page are exactly what is computed
//! here, so the hardware digest is this module's [`LaunchDigest`] run over
//! more pages. Intel TDX measures differently (MRTD for the initial image,
//! RTMRs extended by the firmware with the kernel, initrd and command line)
//! and needs its own function.
//!
//! The `sev` crate has this computation, but only under its `crypto_nossl`
//! feature, which pulls in the `rsa` crate (RUSTSEC-2023-0071, banned in
//! deny.toml); hence capsa's own code, over aws-lc-rs.

use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{self, SHA256, SHA384};

/// Bytes in a SHA-256 hash.
pub const SHA256_LEN: usize = 32;
/// Bytes in a launch digest (SHA-384).
pub const DIGEST_LEN: usize = 48;
/// Bytes in a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Guest-physical address of the page holding the hashes table: OVMF
/// AmdSev's `PcdQemuHashTableBase` (0x810C00) rounded down to its page.
pub const HASHES_PAGE_GPA: u64 = 0x0081_0000;
/// Offset of the hashes table within its page (0x810C00 - 0x810000).
pub const HASHES_TABLE_OFFSET: usize = 0xC00;
/// Bytes in one hashes-table entry: GUID, `u16` length, SHA-256.
pub const SEV_HASH_TABLE_ENTRY_LEN: usize = 16 + 2 + SHA256_LEN;
/// Bytes in the hashes table: header GUID, `u16` length, three entries.
pub const SEV_HASH_TABLE_LEN: usize = 16 + 2 + 3 * SEV_HASH_TABLE_ENTRY_LEN;
/// The table zero-padded to a multiple of 16 bytes, as QEMU writes it.
pub const SEV_HASH_TABLE_PADDED_LEN: usize = SEV_HASH_TABLE_LEN.next_multiple_of(16);
/// Bytes in an SNP `PAGE_INFO` structure.
pub const PAGE_INFO_LEN: usize = 0x70;

// The table must fit in its page where OVMF reserves it (0x400 bytes).
const _: () = assert!(HASHES_TABLE_OFFSET + SEV_HASH_TABLE_PADDED_LEN <= PAGE_SIZE);

/// A UEFI GUID, stored in its in-memory encoding: the first three fields
/// little-endian, the last eight bytes as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid([u8; 16]);

impl Guid {
    /// The GUID `d1-d2-d3-d4[0..2]-d4[2..8]` as it is written in text.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let [a0, a1, a2, a3] = d1.to_le_bytes();
        let [b0, b1] = d2.to_le_bytes();
        let [c0, c1] = d3.to_le_bytes();
        let [e0, e1, e2, e3, e4, e5, e6, e7] = d4;
        Self([a0, a1, a2, a3, b0, b1, c0, c1, e0, e1, e2, e3, e4, e5, e6, e7])
    }

    /// The 16 bytes as they sit in guest memory.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a0, a1, a2, a3, b0, b1, c0, c1, e0, e1, e2, e3, e4, e5, e6, e7] = self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{e0:02x}{e1:02x}-{e2:02x}{e3:02x}{e4:02x}{e5:02x}{e6:02x}{e7:02x}",
            u32::from_le_bytes([a0, a1, a2, a3]),
            u16::from_le_bytes([b0, b1]),
            u16::from_le_bytes([c0, c1]),
        )
    }
}

/// The hashes table's header GUID (QEMU `sev_hash_table_header_guid`).
pub const SEV_HASH_TABLE_GUID: Guid =
    Guid::from_fields(0x9438_d606, 0x4f22, 0x4cc9, [0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21]);
/// The command line's entry.
pub const SEV_CMDLINE_ENTRY_GUID: Guid =
    Guid::from_fields(0x97d0_2dd8, 0xbd20, 0x4c94, [0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a]);
/// The initrd's entry.
pub const SEV_INITRD_ENTRY_GUID: Guid =
    Guid::from_fields(0x44ba_f731, 0x3a2f, 0x4bd7, [0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d]);
/// The kernel's entry.
pub const SEV_KERNEL_ENTRY_GUID: Guid =
    Guid::from_fields(0x4de7_9437, 0xabd2, 0x427f, [0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b]);

/// Copies `parts`, in order, into an array of exactly their total length.
fn concat<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    debug_assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), N);
    let mut out = [0u8; N];
    for (slot, byte) in out.iter_mut().zip(parts.iter().flat_map(|p| p.iter())) {
        *slot = *byte;
    }
    out
}

fn sha256(parts: &[&[u8]]) -> [u8; SHA256_LEN] {
    let mut context = digest::Context::new(&SHA256);
    for part in parts {
        context.update(part);
    }
    concat(&[context.finish().as_ref()])
}

fn sha384(data: &[u8]) -> [u8; DIGEST_LEN] {
    concat(&[digest::digest(&SHA384, data).as_ref()])
}

/// The three hashes of measured direct boot, as QEMU computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevHashes {
    /// SHA-256 of the command line followed by one NUL byte.
    pub cmdline: [u8; SHA256_LEN],
    /// SHA-256 of the initrd (of no bytes when there is none).
    pub initrd: [u8; SHA256_LEN],
    /// SHA-256 of the kernel image file.
    pub kernel: [u8; SHA256_LEN],
}

impl SevHashes {
    /// Hashes the three inputs. `cmdline` is hashed as given (QEMU does not
    /// trim it), then a NUL; it cannot hold a NUL itself, as the kernel
    /// would stop reading there.
    pub fn new(kernel: &[u8], initrd: &[u8], cmdline: &str) -> Self {
        Self { cmdline: sha256(&[cmdline.as_bytes(), &[0]]), initrd: sha256(&[initrd]), kernel: sha256(&[kernel]) }
    }

    /// The table, padded, exactly as QEMU writes it into guest memory.
    pub fn table(&self) -> [u8; SEV_HASH_TABLE_PADDED_LEN] {
        let entry_len = (SEV_HASH_TABLE_ENTRY_LEN as u16).to_le_bytes();
        let table_len = (SEV_HASH_TABLE_LEN as u16).to_le_bytes();
        let padding = [0u8; SEV_HASH_TABLE_PADDED_LEN - SEV_HASH_TABLE_LEN];
        concat(&[
            &SEV_HASH_TABLE_GUID.to_bytes(),
            &table_len,
            &SEV_CMDLINE_ENTRY_GUID.to_bytes(),
            &entry_len,
            &self.cmdline,
            &SEV_INITRD_ENTRY_GUID.to_bytes(),
            &entry_len,
            &self.initrd,
            &SEV_KERNEL_ENTRY_GUID.to_bytes(),
            &entry_len,
            &self.kernel,
            &padding,
        ])
    }

    /// The page at [`HASHES_PAGE_GPA`]: zeros, and the table at
    /// [`HASHES_TABLE_OFFSET`] (QEMU clears the page before copying the
    /// table in, so the rest is zero).
    pub fn page(&self) -> Box<[u8; PAGE_SIZE]> {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        for (slot, byte) in page.iter_mut().skip(HASHES_TABLE_OFFSET).zip(self.table()) {
            *slot = byte;
        }
        page
    }
}

/// An SNP page type (SNP firmware ABI, `SNP_LAUNCH_UPDATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageType {
    /// Data the VMM supplies, measured by its contents.
    Normal = 0x01,
    /// A vCPU's initial register state.
    Vmsa = 0x02,
    /// A page of zeros.
    Zero = 0x03,
    /// A page whose contents are not measured.
    Unmeasured = 0x04,
    /// The secrets page the firmware fills.
    Secrets = 0x05,
    /// The CPUID page the firmware checks.
    Cpuid = 0x06,
}

/// One `PAGE_INFO` structure, less the current digest that heads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    /// SHA-384 of the page for NORMAL and VMSA pages; zeros for the others.
    pub contents: [u8; DIGEST_LEN],
    /// The page type.
    pub page_type: PageType,
    /// Whether the page is part of an incoming migration image.
    pub imi_page: bool,
    /// VMPL3's permissions on the page.
    pub vmpl3_perms: u8,
    /// VMPL2's permissions on the page.
    pub vmpl2_perms: u8,
    /// VMPL1's permissions on the page.
    pub vmpl1_perms: u8,
    /// The page's guest-physical address.
    pub gpa: u64,
}

impl PageInfo {
    /// A NORMAL page at `gpa`, as a VMM launches it (no IMI, no VMPL
    /// permissions).
    pub fn normal(gpa: u64, page: &[u8; PAGE_SIZE]) -> Self {
        Self {
            contents: sha384(page),
            page_type: PageType::Normal,
            imi_page: false,
            vmpl3_perms: 0,
            vmpl2_perms: 0,
            vmpl1_perms: 0,
            gpa,
        }
    }

    /// The 0x70 bytes the firmware hashes, after `digest_cur`.
    pub fn encode(&self, digest_cur: &[u8; DIGEST_LEN]) -> [u8; PAGE_INFO_LEN] {
        concat(&[
            digest_cur,
            &self.contents,
            &(PAGE_INFO_LEN as u16).to_le_bytes(),
            &[self.page_type as u8, u8::from(self.imi_page), self.vmpl3_perms, self.vmpl2_perms, self.vmpl1_perms, 0],
            &self.gpa.to_le_bytes(),
        ])
    }
}

/// An SEV-SNP launch digest being built, page by page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDigest([u8; DIGEST_LEN]);

impl Default for LaunchDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl LaunchDigest {
    /// The digest before any page: all zeros.
    pub const fn new() -> Self {
        Self([0; DIGEST_LEN])
    }

    /// Folds one page in: the digest becomes SHA-384 of the `PAGE_INFO`.
    pub fn update(&mut self, page: &PageInfo) {
        self.0 = sha384(&page.encode(&self.0));
    }

    /// The digest so far.
    pub const fn to_bytes(self) -> [u8; DIGEST_LEN] {
        self.0
    }
}

/// The launch digest of a sandbox booting `kernel` with `initrd` and
/// `cmdline`: the SNP launch digest over the hashes page alone (see the
/// module documentation).
pub fn launch_digest(kernel: &[u8], initrd: &[u8], cmdline: &str) -> [u8; DIGEST_LEN] {
    let page = SevHashes::new(kernel, initrd, cmdline).page();
    let mut digest = LaunchDigest::new();
    digest.update(&PageInfo::normal(HASHES_PAGE_GPA, &page));
    digest.to_bytes()
}

/// Why a launch digest could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// An input file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// Which input (`kernel`, `initrd`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// [`launch_digest`] of a kernel file and an initrd file.
pub fn launch_digest_of_files(kernel: &Path, initrd: &Path, cmdline: &str) -> Result<[u8; DIGEST_LEN], MeasureError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| MeasureError::Read { what, path: path.to_path_buf(), source })
    };
    Ok(launch_digest(&read("kernel", kernel)?, &read("initrd", initrd)?, cmdline))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn guids_use_the_uefi_byte_order() {
        let expected = [0x06, 0xd6, 0x38, 0x94, 0x22, 0x4f, 0xc9, 0x4c, 0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21];
        assert_eq!(SEV_HASH_TABLE_GUID.to_bytes(), expected);
        assert_eq!(SEV_HASH_TABLE_GUID.to_string(), "9438d606-4f22-4cc9-b479-a793d411fd21");
        assert_eq!(SEV_CMDLINE_ENTRY_GUID.to_string(), "97d02dd8-bd20-4c94-aa78-e7714d36ab2a");
        assert_eq!(SEV_INITRD_ENTRY_GUID.to_string(), "44baf731-3a2f-4bd7-9af1-41e29169781d");
        assert_eq!(SEV_KERNEL_ENTRY_GUID.to_string(), "4de79437-abd2-427f-b835-d5b172d2045b");
    }

    #[test]
    fn the_table_is_laid_out_as_qemu_writes_it() {
        let hashes = SevHashes::new(b"kernel", b"initrd", "console=ttyS0");
        let table = hashes.table();
        assert_eq!(table.len(), 176);
        // Header GUID, then the length 168 (0xa8) little-endian.
        assert_eq!(hex(&table[..18]), ["06d63894224fc94cb479a793d411fd21", "a800"].concat(), "header");
        let entry = |i: usize| &table[18 + 50 * i..18 + 50 * (i + 1)];
        // Cmdline first: its GUID (97d02dd8-bd20-4c94-aa78-e7714d36ab2a), length 50 (0x32).
        assert_eq!(hex(&entry(0)[..18]), "d82dd09720bd944caa78e7714d36ab2a3200");
        assert_eq!(hex(&entry(1)[..18]), "31f7ba442f3ad74b9af141e29169781d3200");
        assert_eq!(hex(&entry(2)[..18]), "3794e74dd2ab7f42b835d5b172d2045b3200");
        // The command line is hashed with its NUL; initrd and kernel as they are.
        assert_eq!(&entry(0)[18..], sha256(&[b"console=ttyS0\0"]));
        assert_eq!(&entry(1)[18..], sha256(&[b"initrd"]));
        assert_eq!(&entry(2)[18..], sha256(&[b"kernel"]));
        assert_eq!(&table[168..], [0u8; 8], "padding");

        let page = hashes.page();
        assert!(page[..HASHES_TABLE_OFFSET].iter().all(|b| *b == 0));
        assert_eq!(&page[HASHES_TABLE_OFFSET..HASHES_TABLE_OFFSET + 176], table);
        assert!(page[HASHES_TABLE_OFFSET + 176..].iter().all(|b| *b == 0));
    }

    #[test]
    fn page_info_is_0x70_bytes_in_abi_order() {
        let info = PageInfo {
            contents: [0xcc; 48],
            page_type: PageType::Normal,
            imi_page: true,
            vmpl3_perms: 3,
            vmpl2_perms: 2,
            vmpl1_perms: 1,
            gpa: 0x0011_2233_4455_6677,
        };
        let bytes = info.encode(&[0xdd; 48]);
        assert_eq!(&bytes[..48], [0xdd; 48]);
        assert_eq!(&bytes[48..96], [0xcc; 48]);
        assert_eq!(hex(&bytes[96..]), "7000010103020100".to_owned() + "7766554433221100");
    }

    #[test]
    fn the_digest_is_deterministic_and_every_input_changes_it() {
        let base = launch_digest(b"kernel", b"initrd", "console=ttyS0");
        assert_eq!(base, launch_digest(b"kernel", b"initrd", "console=ttyS0"));
        let others = [
            launch_digest(b"kernel!", b"initrd", "console=ttyS0"),
            launch_digest(b"kernel", b"initrd!", "console=ttyS0"),
            launch_digest(b"kernel", b"initrd", "console=ttyS0 "),
            launch_digest(b"kernel", b"", "console=ttyS0"),
            launch_digest(b"kernel", b"initrd", ""),
            // Swapping kernel and initrd must not give the same value.
            launch_digest(b"initrd", b"kernel", "console=ttyS0"),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(&base, other, "variant {i}");
        }
        assert_ne!(base, [0; 48]);
    }

    /// A vector computed independently, with Python's hashlib and uuid
    /// (`bytes_le` is the UEFI GUID encoding), by this script:
    ///
    /// ```text
    /// import hashlib, struct, uuid
    /// def entry(guid, data):
    ///     return uuid.UUID(guid).bytes_le + struct.pack('<H', 50) + hashlib.sha256(data).digest()
    /// body = (entry('97d02dd8-bd20-4c94-aa78-e7714d36ab2a', b'console=ttyS0 panic=-1\0')
    ///         + entry('44baf731-3a2f-4bd7-9af1-41e29169781d', b'capsa test initrd')
    ///         + entry('4de79437-abd2-427f-b835-d5b172d2045b', b'capsa test kernel'))
    /// table = uuid.UUID('9438d606-4f22-4cc9-b479-a793d411fd21').bytes_le + struct.pack('<H', 18 + len(body)) + body
    /// table += bytes(-len(table) % 16)
    /// page = bytes(0xc00) + table + bytes(4096 - 0xc00 - len(table))
    /// info = bytes(48) + hashlib.sha384(page).digest() + struct.pack('<HBBBBBBQ', 0x70, 1, 0, 0, 0, 0, 0, 0x810000)
    /// print(hashlib.sha384(info).hexdigest())
    /// ```
    #[test]
    fn a_known_vector() {
        let digest = launch_digest(b"capsa test kernel", b"capsa test initrd", "console=ttyS0 panic=-1");
        assert_eq!(hex(&digest), VECTOR);
    }
    const VECTOR: &str =
        "dd9017af42fea478c446c305111bf5b91419f3a36bdb1620196dc127bad72708ef6c830dcfecfe7e40ccb6b1015e094e";

    #[test]
    fn files_are_read_and_missing_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd.img"));
        std::fs::write(&kernel, b"capsa test kernel").unwrap();
        std::fs::write(&initrd, b"capsa test initrd").unwrap();
        assert_eq!(
            launch_digest_of_files(&kernel, &initrd, "console=ttyS0 panic=-1").unwrap(),
            launch_digest(b"capsa test kernel", b"capsa test initrd", "console=ttyS0 panic=-1")
        );
        let err = launch_digest_of_files(&kernel, &dir.path().join("nope"), "").unwrap_err().to_string();
        assert!(err.starts_with("cannot read the initrd ") && err.contains("nope"), "{err}");
    }
}
