//! A length inside a manifest cannot make the decoder allocate more than a
//! small multiple of the manifest's own bytes. The inputs are the ones the
//! `manifest` fuzz target flagged (`fuzz/found/manifest/`): 175 and 65 bytes
//! that made bincode allocate and zero ~256 MiB before finding them short.

use std::sync::atomic::Ordering;

use convoy_chunker::codec::CLAIMS_PER_INPUT_BYTE;
use convoy_chunker::Manifest;

mod common {
    pub mod largest;
}
use common::largest::LARGEST;

const FOUND: [(&str, &[u8]); 2] = [
    (
        "timeout-2cfbccbb",
        include_bytes!(
            "../../fuzz/found/manifest/timeout-2cfbccbbc52755f478870252b7852143a709749e"
        ),
    ),
    (
        "slow-unit-b5010dc8",
        include_bytes!(
            "../../fuzz/found/manifest/slow-unit-b5010dc818482693aad31058af6f60c449adf866"
        ),
    ),
];

/// One test, so no other test's allocations run beside it.
#[test]
fn a_short_manifest_claiming_a_long_string_allocates_in_proportion_to_itself() {
    for (name, bytes) in FOUND {
        LARGEST.store(0, Ordering::Relaxed);
        let err = Manifest::decode(bytes).expect_err(name);
        let largest = LARGEST.load(Ordering::Relaxed);
        // The ladder's first rung is 4 KiB; nothing else here allocates more.
        let budget = (bytes.len() * CLAIMS_PER_INPUT_BYTE).next_power_of_two() * 4;
        assert!(
            largest <= budget.max(1 << 14),
            "{name} ({} bytes) made the decoder allocate {largest} bytes at once ({err})",
            bytes.len()
        );
    }

    // A hand-made one: a valid header, then a name claiming 200 MiB.
    let mut bytes = b"CVYM\x01\x00".to_vec();
    bytes.push(252);
    bytes.extend((200u32 << 20).to_le_bytes());
    bytes.extend(b"web");
    LARGEST.store(0, Ordering::Relaxed);
    let err = Manifest::decode(&bytes).unwrap_err();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 1 << 14,
        "allocated {largest} bytes at once ({err})"
    );
}
