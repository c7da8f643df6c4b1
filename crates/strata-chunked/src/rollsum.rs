//! The content-defined chunker of zstd:chunked (containers/storage's
//! `compressor/rollsum.go`, itself bup's rolling sum).
//!
//! A 64-byte window; `s1` is the window's byte sum and `s2` the sum of the
//! `s1` values, both offset by 31 per byte and wrapping at 2^32. A chunk
//! ends after a byte when the low 16 bits of `s2` are all ones (average
//! ~64 KiB, no minimum, no maximum). Runs of at least 1024 zero bytes are
//! holes: the chunk before ends just before the run, the run is its own
//! `zeros` chunk, and the sum rolls over the zeros without splitting. The
//! state is per file and is not reset at chunk boundaries, so boundaries
//! depend only on content: the same file in two images chunks the same.

const WINDOW: usize = 64;
const CHAR_OFFSET: u32 = 31;
/// Shortest zero run that becomes a hole.
pub const HOLE_THRESHOLD: u64 = 1024;

/// bup's rolling sum.
#[derive(Clone)]
pub struct RollSum {
    s1: u32,
    s2: u32,
    window: [u8; WINDOW],
    wofs: usize,
}

impl Default for RollSum {
    fn default() -> Self {
        RollSum {
            s1: WINDOW as u32 * CHAR_OFFSET,
            s2: WINDOW as u32 * (WINDOW as u32 - 1) * CHAR_OFFSET,
            window: [0; WINDOW],
            wofs: 0,
        }
    }
}

impl RollSum {
    /// Add one byte, dropping the oldest.
    #[inline]
    pub fn roll(&mut self, ch: u8) {
        let drop = self.window[self.wofs] as u32;
        self.s1 = self.s1.wrapping_add(ch as u32).wrapping_sub(drop);
        self.s2 = self
            .s2
            .wrapping_add(self.s1)
            .wrapping_sub((WINDOW as u32).wrapping_mul(drop + CHAR_OFFSET));
        self.window[self.wofs] = ch;
        self.wofs = (self.wofs + 1) & (WINDOW - 1);
    }

    /// Whether a chunk ends after the last byte rolled.
    #[inline]
    pub fn on_split(&self) -> bool {
        self.s2 & 0xffff == 0xffff
    }
}

/// What the chunker tells its caller, in content order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// More bytes of the current data chunk.
    Data(Span),
    /// The current data chunk ends here.
    End,
    /// A hole of `n` zero bytes (its own chunk), preceded by an implicit
    /// `End` of any non-empty data chunk.
    Hole(u64),
}

/// Where the bytes of a [`Event::Data`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// `input[start..start + len]` of the slice given to [`Chunker::feed`].
    Input {
        /// Offset in the slice.
        start: usize,
        /// Length.
        len: usize,
    },
    /// `n` zero bytes held back earlier (a run too short to be a hole).
    Zeros(u64),
}

/// Streaming chunker for one file.
#[derive(Default)]
pub struct Chunker {
    sum: RollSum,
    /// Zero bytes seen but not yet decided on (hole or data).
    zeros: u64,
    /// Bytes in the current data chunk.
    in_chunk: u64,
}

impl Chunker {
    /// Feed `data`; `emit` receives events covering exactly `data` (plus
    /// held-back zeros from earlier calls).
    pub fn feed(&mut self, data: &[u8], emit: &mut dyn FnMut(Event)) {
        let mut start = 0; // first input byte not yet emitted
        let mut i = 0;
        while i < data.len() {
            if data[i] == 0 {
                // Hold zeros back: flush the data before them first.
                if self.zeros == 0 && i > start {
                    emit(Event::Data(Span::Input {
                        start,
                        len: i - start,
                    }));
                }
                let run = data[i..].iter().take_while(|b| **b == 0).count();
                self.zeros += run as u64;
                i += run;
                start = i;
                continue;
            }
            if self.zeros > 0 {
                self.settle_zeros(emit);
            }
            self.sum.roll(data[i]);
            self.in_chunk += 1;
            i += 1;
            if self.sum.on_split() {
                emit(Event::Data(Span::Input {
                    start,
                    len: i - start,
                }));
                emit(Event::End);
                self.in_chunk = 0;
                start = i;
            }
        }
        if self.zeros == 0 && i > start {
            emit(Event::Data(Span::Input {
                start,
                len: i - start,
            }));
        }
    }

    /// Decide on held-back zeros: a hole, or ordinary data rolled byte by byte.
    fn settle_zeros(&mut self, emit: &mut dyn FnMut(Event)) {
        let n = std::mem::take(&mut self.zeros);
        if n >= HOLE_THRESHOLD {
            if self.in_chunk > 0 {
                emit(Event::End);
                self.in_chunk = 0;
            }
            // The window after n >= 64 zeros is all zeros whatever came before.
            for _ in 0..n.min(WINDOW as u64 * 2) {
                self.sum.roll(0);
            }
            // Rolling more zeros over an all-zero window changes s2 by a
            // constant each time; do it arithmetically for long holes.
            let rest = n.saturating_sub(WINDOW as u64 * 2);
            if rest > 0 {
                // With an all-zero window: s1 stays constant (ch = drop = 0);
                // s2 += s1 - 64 * 31 each roll.
                let step = self
                    .sum
                    .s1
                    .wrapping_sub((WINDOW as u32).wrapping_mul(CHAR_OFFSET));
                self.sum.s2 = self.sum.s2.wrapping_add(step.wrapping_mul(rest as u32));
                self.sum.wofs = (self.sum.wofs + (rest % WINDOW as u64) as usize) & (WINDOW - 1);
            }
            emit(Event::Hole(n));
            return;
        }
        let mut pending = 0u64;
        for _ in 0..n {
            self.sum.roll(0);
            self.in_chunk += 1;
            pending += 1;
            if self.sum.on_split() {
                emit(Event::Data(Span::Zeros(pending)));
                emit(Event::End);
                self.in_chunk = 0;
                pending = 0;
            }
        }
        if pending > 0 {
            emit(Event::Data(Span::Zeros(pending)));
        }
    }

    /// End of the file: settle held zeros and end the last chunk.
    pub fn finish(&mut self, emit: &mut dyn FnMut(Event)) {
        if self.zeros > 0 {
            self.settle_zeros(emit);
        }
        if self.in_chunk > 0 {
            emit(Event::End);
            self.in_chunk = 0;
        }
    }
}

/// Chunk a whole buffer: `(offset, len, is_hole)` per chunk. For tests and
/// small inputs.
pub fn chunks_of(data: &[u8]) -> Vec<(u64, u64, bool)> {
    chunks_of_pieces([data])
}

/// [`chunks_of`] for content given in pieces (fed one by one).
fn chunks_of_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut cur = 0u64;
    let mut c = Chunker::default();
    let mut on = |e: Event| match e {
        Event::Data(Span::Input { len, .. }) => cur += len as u64,
        Event::Data(Span::Zeros(n)) => cur += n,
        Event::End => {
            out.push((pos, cur, false));
            pos += cur;
            cur = 0;
        }
        Event::Hole(n) => {
            if cur > 0 {
                out.push((pos, cur, false));
                pos += cur;
                cur = 0;
            }
            out.push((pos, n, true));
            pos += n;
        }
    };
    for p in pieces {
        c.feed(p, &mut on);
    }
    c.finish(&mut on);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    /// The vector from our reading of rollsum.go (sha256 of u32le(i) for
    /// i in 0..6400); cross-checked against skopeo's TOCs by the
    /// integration tests.
    fn vector() -> Vec<u8> {
        (0u32..6400)
            .flat_map(|i| Sha256::digest(i.to_le_bytes()).to_vec())
            .collect()
    }

    #[test]
    fn chunk_boundaries_of_the_reference_vector() {
        let c: Vec<(u64, u64)> = chunks_of(&vector()).iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(
            c,
            [
                (0, 24739),
                (24739, 24076),
                (48815, 88636),
                (137451, 29709),
                (167160, 26624),
                (193784, 11016)
            ]
        );
    }

    #[test]
    fn a_hole_is_its_own_chunk_and_shifts_nothing_else() {
        let mut v = vector();
        v.splice(100000..100000, std::iter::repeat_n(0u8, 4096));
        let c = chunks_of(&v);
        assert_eq!(
            c,
            [
                (0, 24739, false),
                (24739, 24076, false),
                (48815, 51185, false),
                (100000, 4096, true),
                (104096, 37451, false),
                (141547, 29709, false),
                (171256, 26624, false),
                (197880, 11016, false)
            ]
        );
    }

    #[test]
    fn feeding_in_pieces_gives_the_same_chunks() {
        let mut v = vector();
        v.splice(5000..5000, std::iter::repeat_n(0u8, 1000)); // short run: data
        v.splice(90000..90000, std::iter::repeat_n(0u8, 300_000)); // long hole
        let whole = chunks_of(&v);
        for piece in [1usize, 7, 511, 4096, 65536] {
            let out = chunks_of_pieces(v.chunks(piece));
            assert_eq!(out, whole, "piece size {piece}");
        }
    }

    #[test]
    fn long_hole_shortcut_equals_rolling_every_zero() {
        let mut a = RollSum::default();
        for b in vector().iter().take(1000) {
            a.roll(*b);
        }
        let mut b = a.clone();
        for _ in 0..100_000 {
            a.roll(0);
        }
        let mut c = Chunker {
            sum: b.clone(),
            zeros: 100_000,
            in_chunk: 0,
        };
        c.settle_zeros(&mut |_| {});
        b = c.sum;
        assert_eq!(
            (a.s1, a.s2, a.window, a.wofs),
            (b.s1, b.s2, b.window, b.wofs)
        );
    }
}
