//! SEV-SNP report framing: any 1184-byte input parses or is refused, and a
//! parsed report can always be described.
#![no_main]

use capsa_tee::snp::Report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = Report::parse(data) {
        let _ = report.describe(None);
    }
});
