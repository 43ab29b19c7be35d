//! A manifest from anyone: decode and validate. What decodes encodes to
//! a manifest that decodes to itself, with the same release id each time.
#![no_main]

use convoy_chunker::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::decode(data) else {
        return;
    };
    let encoded = manifest.encode();
    let again = Manifest::decode(&encoded).expect("a valid manifest's encoding decodes");
    assert_eq!(again, manifest);
    assert_eq!(again.encode(), encoded, "the encoding is canonical");
    assert_eq!(again.release_id(), manifest.release_id());
    let _ = manifest.unique_chunks();
    let _ = manifest.file_totals();
});
