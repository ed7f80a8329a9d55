//! Pod manifests: `resources_from_pod_yaml` sizes a sandbox from any UTF-8
//! text without panicking, and never below one CPU and the guest overhead.
#![no_main]

use capsa_runtime::pod::{GUEST_OVERHEAD_MIB, resources_from_pod_yaml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let resources = resources_from_pod_yaml(text);
    assert!(resources.cpus >= 1, "{resources:?}");
    assert!(resources.memory_mib >= GUEST_OVERHEAD_MIB, "{resources:?}");
});
