//! LUKS2 headers: `LuksHeader::parse` never panics, on raw bytes (first byte
//! even) or on the input as the JSON area of two otherwise valid header
//! copies with correct checksums (first byte odd), so that mutations reach
//! the metadata checks instead of stopping at the checksum. A header that
//! parses is unlocked with a fixed passphrase over the same bytes (keyslot
//! areas of zeros), when its PBKDF2 iteration counts are small.
#![no_main]

use aws_lc_rs::digest::{SHA256, digest};
use capsa_encfs::luks::LuksHeader;
use libfuzzer_sys::fuzz_target;

const HDR_SIZE: usize = 16384;
/// Both copies, then zeros to the end of the default keyslot 0 area.
const IMAGE_LEN: usize = 290_816;

/// Two header copies around `json`, checksummed as cryptsetup writes them.
fn wrap(json: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; IMAGE_LEN];
    let json = &json[..json.len().min(HDR_SIZE - 4096 - 1)];
    for (offset, magic) in [(0, b"LUKS\xba\xbe"), (HDR_SIZE, b"SKUL\xba\xbe")] {
        let copy = &mut image[offset..offset + HDR_SIZE];
        copy[..6].copy_from_slice(magic);
        copy[6..8].copy_from_slice(&2u16.to_be_bytes());
        copy[8..16].copy_from_slice(&(HDR_SIZE as u64).to_be_bytes());
        copy[16..24].copy_from_slice(&1u64.to_be_bytes());
        copy[72..78].copy_from_slice(b"sha256");
        copy[256..264].copy_from_slice(&(offset as u64).to_be_bytes());
        copy[4096..4096 + json.len()].copy_from_slice(json);
        let sum = digest(&SHA256, copy);
        copy[448..480].copy_from_slice(sum.as_ref());
    }
    image
}

/// Whether every "iterations" in the JSON is at most 1000 (a mutated
/// header may ask for 10^8, which is a slow input, not a bug).
fn cheap(json: &[u8]) -> bool {
    fn walk(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::Object(map) => {
                map.iter().all(|(k, v)| (k != "iterations" || v.as_u64().is_some_and(|n| n <= 1000)) && walk(v))
            }
            serde_json::Value::Array(items) => items.iter().all(walk),
            _ => true,
        }
    }
    let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
    serde_json::from_slice::<serde_json::Value>(&json[..end]).is_ok_and(|v| walk(&v))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let image = if mode & 1 == 0 { rest.to_vec() } else { wrap(rest) };
    if let Ok(header) = LuksHeader::parse(&image) {
        let _ = (header.uuid(), header.data_offset(), header.data_size(), header.keyslots());
        // The JSON area of the copy that was used.
        let size = header.header_size() as usize;
        let start = if header.from_secondary() { size } else { 0 };
        let json = image.get(start + 4096..start + size).unwrap_or_default();
        if cheap(json) {
            let _ = header.unlock_bytes(&image, b"fuzz passphrase");
        }
    }
});
