//! Writing one pre-built frame to many sockets: the relay's broadcast loop, without Python.
//!
//! A broadcast is one `send` per member. Writing each through its asyncio transport adds a
//! Python call and the transport's bookkeeping to every `send`; here the whole loop runs in
//! Rust with the GIL released (benches/fanout: at 500 members 1.23x the frames per CPU-second
//! of a server writing through the transports). No library does this (it is a loop of
//! non-blocking `send`s whose shortfalls are handed back), hence the few lines of `libc`.
//!
//! The caller keeps every guarantee of the event loop's transports: it passes only sockets
//! whose transport has nothing buffered and is not closing, and it hands whatever did not
//! fit ([`Shortfall`]) to the transport, which buffers it and resumes when the socket drains.
//! Frame order per socket is therefore kept: nothing else writes between our `send` and the
//! transport write of the remainder (both happen in one call on the event-loop thread).

/// A socket that did not take the whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Position of the socket in the list given to [`send_to_all`].
    pub index: usize,
    /// Bytes of the frame the socket took (0 when it took none or failed).
    pub sent: usize,
}

/// Sends `frame` to each socket in `fds` without blocking; returns the sockets that did not
/// take all of it. A socket that fails (closed by the peer, say) is reported with what it
/// took: its transport then meets the same error on its own write and closes the connection
/// as it would have without us.
#[cfg(unix)]
pub fn send_to_all(fds: &[i32], frame: &[u8]) -> Vec<Shortfall> {
    let mut short = Vec::new();
    for (index, &fd) in fds.iter().enumerate() {
        let sent = send_nonblocking(fd, frame);
        if sent < frame.len() {
            short.push(Shortfall { index, sent });
        }
    }
    short
}

/// Bytes of `data` the socket took before it would block or failed.
#[cfg(unix)]
fn send_nonblocking(fd: i32, data: &[u8]) -> usize {
    // MSG_DONTWAIT: never block the event-loop thread, whatever the socket's flags are.
    // MSG_NOSIGNAL: a peer that went away gives EPIPE, not SIGPIPE.
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        // SAFETY: `rest` is a valid, initialised buffer of `rest.len()` bytes for the whole
        // call; `send` only reads it. An invalid `fd` is reported as an error (EBADF).
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), flags) };
        if n > 0 {
            sent += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            break;
        }
    }
    sent
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (server, client)
    }

    #[test]
    fn every_socket_gets_the_whole_frame() {
        let pairs: Vec<_> = (0..4).map(|_| tcp_pair()).collect();
        let fds: Vec<i32> = pairs.iter().map(|(s, _)| s.as_raw_fd()).collect();
        let frame = b"\x81\x05hello";
        assert_eq!(send_to_all(&fds, frame), vec![]);
        for (_, mut client) in pairs {
            let mut got = [0u8; 7];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, frame);
        }
    }

    #[test]
    fn a_full_socket_reports_what_it_took_and_the_others_are_served() {
        let (full, _full_client) = tcp_pair();
        let (ok, mut ok_client) = tcp_pair();
        // Fill `full`'s buffers: the peer never reads.
        let big = vec![7u8; 1 << 20];
        let mut shortfalls = Vec::new();
        for _ in 0..64 {
            shortfalls = send_to_all(&[full.as_raw_fd()], &big);
            if !shortfalls.is_empty() {
                break;
            }
        }
        assert_eq!(shortfalls.len(), 1, "the socket never filled up");
        assert!(shortfalls[0].sent < big.len());

        // The full socket refuses (the kernel may still take a few bytes while it moves data
        // to the peer, so try a few times); the other socket takes every frame meanwhile.
        let mut refused = false;
        let mut frames = 0;
        while !refused && frames < 1000 {
            let short = send_to_all(&[full.as_raw_fd(), ok.as_raw_fd()], b"frame");
            assert!(short.iter().all(|s| s.index == 0), "{short:?}");
            refused = short == vec![Shortfall { index: 0, sent: 0 }];
            frames += 1;
        }
        assert!(refused, "the full socket kept taking frames");
        let mut got = vec![0u8; 5 * frames];
        ok_client.read_exact(&mut got).unwrap();
        assert_eq!(got, b"frame".repeat(frames));
    }

    #[test]
    fn bad_and_closed_sockets_are_shortfalls_not_crashes() {
        let (server, client) = tcp_pair();
        drop(client);
        let fds = [-1, i32::MAX, server.as_raw_fd()];
        // The peer is gone: the first send may still be accepted by the kernel (the reset
        // arrives later), so only the two invalid descriptors are certain shortfalls.
        let short = send_to_all(&fds, b"x");
        assert!(short.contains(&Shortfall { index: 0, sent: 0 }));
        assert!(short.contains(&Shortfall { index: 1, sent: 0 }));
    }
}
