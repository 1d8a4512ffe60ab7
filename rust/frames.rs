//! Reading the relay's incoming WebSocket data frames: the client frames at the start of a
//! read, found and unmasked in one call (kasagi_relay/session.py, `RelayConnection._receive`).
//!
//! websockets parses each frame with a chain of generators; the relay reads the common case
//! itself: complete, final, masked text and binary frames without RSV bits (RFC 6455 5.2),
//! and stops at the first byte that starts anything else, which websockets then parses and,
//! when it is wrong, refuses with its usual close code. The Python version of this loop
//! (`session._data_frames`, kept as the fallback and the reference of the tests) took ~4 %
//! of the memory ingest path (py-spy); no library reads frames without taking the socket.

/// Opcode of a text frame.
pub const TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const BINARY: u8 = 0x2;

/// One data frame found by [`scan`]: its opcode, where its payload lies in the input, and
/// the mask to unmask it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    pub opcode: u8,
    pub start: usize,
    pub len: usize,
    pub mask: [u8; 4],
}

/// The complete final masked text and binary frames without RSV bits at the start of
/// `data`, each with a payload of at most `max_size` bytes (None: no limit), and how many
/// bytes they take. Work and output are bounded by `data.len()`; any length is safe (a
/// 64-bit length past the input just ends the scan).
pub fn scan(data: &[u8], max_size: Option<u64>) -> (Vec<FrameRef>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    let end = data.len();
    while end - pos >= 6 {
        // A masked frame's shortest header.
        let opcode = match data[pos] {
            0x81 => TEXT,
            0x82 => BINARY,
            _ => break,
        };
        let head2 = data[pos + 1];
        if head2 < 0x80 {
            break; // not masked
        }
        let mut length = u64::from(head2 & 0x7F);
        let mut start = pos + 2;
        if length == 126 {
            // At least 4 bytes remain (end - pos >= 6).
            length = u64::from(u16::from_be_bytes([data[start], data[start + 1]]));
            start += 2;
        } else if length == 127 {
            if end - start < 8 {
                break;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[start..start + 8]);
            length = u64::from_be_bytes(b);
            start += 8;
        }
        if max_size.is_some_and(|m| length > m) {
            break;
        }
        // The mask and the payload must be in `data`; compared without overflow.
        let Some(rest) = (end - start).checked_sub(4) else {
            break;
        };
        if length > rest as u64 {
            break;
        }
        let len = length as usize;
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&data[start..start + 4]);
        frames.push(FrameRef {
            opcode,
            start: start + 4,
            len,
            mask,
        });
        pos = start + 4 + len;
    }
    (frames, pos)
}

/// `src` XOR the repeated `mask` into `dst` (the same length): RFC 6455 5.3.
pub fn unmask(src: &[u8], mask: [u8; 4], dst: &mut [u8]) {
    debug_assert_eq!(src.len(), dst.len());
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut s = src.chunks_exact(8);
    let mut d = dst.chunks_exact_mut(8);
    for (a, b) in (&mut s).zip(&mut d) {
        let mut w = [0u8; 8];
        w.copy_from_slice(a);
        b.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the mask's phase is 0 again.
    for (i, (a, b)) in s.remainder().iter().zip(d.into_remainder()).enumerate() {
        *b = a ^ mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame as RFC 6455 writes it.
    fn frame(first: u8, payload: &[u8], mask: [u8; 4], wide: bool) -> Vec<u8> {
        let mut out = vec![first];
        let n = payload.len();
        if wide || n > 65535 {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        } else if n < 126 {
            out.push(0x80 | n as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn read(data: &[u8], max: Option<u64>) -> (Vec<(u8, Vec<u8>)>, usize) {
        let (refs, used) = scan(data, max);
        let frames = refs
            .iter()
            .map(|f| {
                let mut out = vec![0; f.len];
                unmask(&data[f.start..f.start + f.len], f.mask, &mut out);
                (f.opcode, out)
            })
            .collect();
        (frames, used)
    }

    #[test]
    fn reads_text_and_binary_frames_of_every_length_class() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for n in [0usize, 1, 7, 8, 9, 125, 126, 1000, 65535, 65536] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let mut wire = frame(0x81, &payload, mask, false);
            wire.extend(frame(0x82, b"xyz", mask, true));
            let (frames, used) = read(&wire, None);
            assert_eq!(used, wire.len());
            assert_eq!(
                frames,
                vec![(TEXT, payload.clone()), (BINARY, b"xyz".to_vec())]
            );
        }
    }

    #[test]
    fn stops_at_what_it_does_not_read() {
        let mask = [1, 2, 3, 4];
        let whole = frame(0x81, b"abc", mask, false);
        let mut unmasked = frame(0x81, b"abc", mask, false);
        unmasked[1] &= 0x7F;
        let huge_len = {
            let mut f = vec![0x82, 0x80 | 127];
            f.extend_from_slice(&u64::MAX.to_be_bytes());
            f.extend_from_slice(&mask);
            f
        };
        for rest in [
            whole[..5].to_vec(),                   // incomplete
            frame(0x01, b"abc", mask, false),      // not final
            frame(0x88, b"", mask, false),         // close
            frame(0x89, b"p", mask, false),        // ping
            frame(0xC1, b"abc", mask, false),      // RSV1
            unmasked,                              // not masked
            frame(0x81, &[b'x'; 11], mask, false), // over max_size below
            frame(0x81, &[b'x'; 300], mask, false)[..8].to_vec(),
            frame(0x81, b"x", mask, true)[..9].to_vec(),
            huge_len,
        ] {
            let mut wire = whole.clone();
            wire.extend_from_slice(&rest);
            let (frames, used) = read(&wire, Some(10));
            assert_eq!(frames, vec![(TEXT, b"abc".to_vec())], "{rest:?}");
            assert_eq!(used, whole.len());
        }
    }

    #[test]
    fn unmask_matches_the_bytewise_rule_at_every_length() {
        let mask = [0xA5, 0x0F, 0xF0, 0x3C];
        for n in 0..40 {
            let src: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut dst = vec![0; n];
            unmask(&src, mask, &mut dst);
            let want: Vec<u8> = src
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(dst, want);
        }
    }
}
