//! Bytes on the wire: every byte a daemon's TCP connections carry, each
//! way — chunk bodies and everything around them (control messages, have
//! announcements, bitfields, the handshake, TLS or noise and yamux framing).
//!
//! The counting wraps the TCP stream below the security handshake, so the figures are what
//! crossed the sockets; the two ends of a connection count the same bytes,
//! which lets a benchmark check its senders' sums against its receivers'.
//! QUIC connections are not counted.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// A daemon's wire counters, shared by its connections.
#[derive(Debug, Default)]
pub struct WireCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl WireCounters {
    /// Bytes written to and read from its TCP connections since it started.
    pub fn get(&self) -> WireBytes {
        WireBytes {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A reading of [`WireCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireBytes {
    /// Written to its connections.
    pub sent: u64,
    /// Read from its connections.
    pub received: u64,
}

/// A stream whose reads and writes are added to [`WireCounters`].
pub struct Counted<S> {
    inner: S,
    counters: Arc<WireCounters>,
}

impl<S> Counted<S> {
    /// Counts `inner`'s traffic in `counters`.
    pub fn new(inner: S, counters: Arc<WireCounters>) -> Self {
        Self { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters
                .received
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn reads_and_writes_are_counted_as_they_complete() {
        futures::executor::block_on(async {
            let counters = Arc::new(WireCounters::default());
            let mut out = Counted::new(futures::io::Cursor::new(Vec::new()), counters.clone());
            out.write_all(&[1; 10]).await.unwrap();
            out.write_all(&[1; 5]).await.unwrap();
            let mut inp = Counted::new(futures::io::Cursor::new(vec![2u8; 7]), counters.clone());
            let mut got = Vec::new();
            inp.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), 7);
            assert_eq!(
                counters.get(),
                WireBytes {
                    sent: 15,
                    received: 7
                }
            );
        });
    }
}
