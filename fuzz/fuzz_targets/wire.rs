//! Every frame a peer can send, read as the daemon reads it: the first
//! byte picks the message type, the rest is the stream's bytes (length
//! prefix, body, whatever follows). What reads back writes and reads
//! again to the same message.
#![no_main]

use std::fmt::Debug;

use convoy_protocol::wire::{
    encode_frame, read_frame, Announcement, ChunkRequest, ChunkResponse, ControlRequest,
    ControlResponse, Hello, Tagged, Welcome, MAX_CHUNK_FRAME, MAX_CONTROL_FRAME, MAX_HAVE_BATCH,
    MAX_HAVE_FRAME, MAX_HELLO_FRAME,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn frame<T, const LIMIT: usize>(stream: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let mut io = futures::io::Cursor::new(stream);
    let Ok(message) = futures::executor::block_on(read_frame::<T, _, LIMIT>(&mut io)) else {
        return;
    };
    let written = encode_frame::<T, LIMIT>(&message).expect("what was read can be written");
    assert!(written.len() <= LIMIT + 4);
    let mut io = futures::io::Cursor::new(&written[..]);
    let again = futures::executor::block_on(read_frame::<T, _, LIMIT>(&mut io))
        .expect("what was written reads back");
    assert_eq!(again, message);
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, stream)) = data.split_first() else {
        return;
    };
    match kind % 7 {
        0 => frame::<Hello, MAX_HELLO_FRAME>(stream),
        1 => frame::<Welcome, MAX_HELLO_FRAME>(stream),
        2 => frame::<ControlRequest, MAX_CONTROL_FRAME>(stream),
        3 => frame::<ControlResponse, MAX_CONTROL_FRAME>(stream),
        4 => frame::<Tagged<ChunkRequest>, MAX_CHUNK_FRAME>(stream),
        5 => frame::<Tagged<ChunkResponse>, MAX_CHUNK_FRAME>(stream),
        _ => {
            frame::<Announcement, MAX_HAVE_FRAME>(stream);
            // The reader's check after decoding: the frame limit allows
            // no more indices than a batch.
            let mut io = futures::io::Cursor::new(stream);
            if let Ok(a) = futures::executor::block_on(
                read_frame::<Announcement, _, MAX_HAVE_FRAME>(&mut io),
            ) {
                assert!(a.chunks.len() <= MAX_HAVE_BATCH);
            }
        }
    }
});
