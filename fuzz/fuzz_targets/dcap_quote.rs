//! Intel DCAP quotes: description, and full verification as TDX and as SGX
//! against real collateral at an instant inside its validity window.
#![no_main]

use std::sync::OnceLock;

use capsa_tee::dcap::{Collateral, QuoteKind, describe_quote, verify_quote};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;
use time::macros::datetime;

const TDX_COLLATERAL: &[u8] = include_bytes!("../../../shared/testdata/evidence/tdx/collateral.json");
const SGX_COLLATERAL: &[u8] = include_bytes!("../../../shared/testdata/evidence/sgx/collateral.json");
/// Inside both collaterals' windows (2025-06-19 to 2025-07-19).
const AT: OffsetDateTime = datetime!(2025-07-01 00:00 UTC);

fn collateral(json: &[u8]) -> Collateral {
    Collateral::from_json(json).unwrap_or_else(|e| panic!("the fixture collateral must parse: {e}"))
}

fuzz_target!(|data: &[u8]| {
    static COLLATERAL: OnceLock<(Collateral, Collateral)> = OnceLock::new();
    let (tdx, sgx) = COLLATERAL.get_or_init(|| (collateral(TDX_COLLATERAL), collateral(SGX_COLLATERAL)));
    let _ = describe_quote(data);
    let _ = verify_quote(QuoteKind::Tdx, data, tdx, AT, &Default::default());
    let _ = verify_quote(QuoteKind::Sgx, data, sgx, AT, &Default::default());
});
