//! A length inside a frame cannot make the decoder allocate more than a small
//! multiple of the frame's own bytes: a peer that sends 60 bytes claiming a
//! 60 MiB bitfield costs 60 bytes, not 60 MiB (32 such requests may be in
//! flight per peer).

use std::sync::atomic::Ordering;

use convoy_protocol::wire::{decode, encode, ControlRequest, Place, MAX_CONTROL_FRAME};

#[path = "../../chunker/tests/common/largest.rs"]
mod largest;
use largest::LARGEST;

#[test]
fn a_short_control_frame_claiming_a_long_bitfield_allocates_in_proportion_to_itself() {
    let real = ControlRequest::Bitfield {
        release: convoy_chunker::ReleaseId([7; 32]),
        len: 32,
        bits: vec![0xAA; 4],
        place: Place::default(),
    };
    let mut body = encode::<_, MAX_CONTROL_FRAME>(&real).unwrap();
    // The body ends with the bits' length (one byte: 4), the four bytes
    // and the empty place (two empty strings).
    assert_eq!(&body[body.len() - 7..], &[4, 0xAA, 0xAA, 0xAA, 0xAA, 0, 0]);
    body.truncate(body.len() - 7);
    body.push(252); // a u32 length follows
    body.extend((60u32 << 20).to_le_bytes());
    body.extend([0xAA; 16]);

    LARGEST.store(0, Ordering::Relaxed);
    let err = decode::<ControlRequest, MAX_CONTROL_FRAME>(&body).unwrap_err();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 1 << 14,
        "a {}-byte frame made the decoder allocate {largest} bytes at once ({err})",
        body.len()
    );

    // The real one still decodes.
    let body = encode::<_, MAX_CONTROL_FRAME>(&real).unwrap();
    assert!(matches!(
        decode::<ControlRequest, MAX_CONTROL_FRAME>(&body).unwrap(),
        ControlRequest::Bitfield { len: 32, .. }
    ));
}
