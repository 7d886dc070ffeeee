//! Finds the end of a JSON object 64 bytes at a time: the record scanner's hot loop.
//!
//! Each 64-byte block is turned into bit masks (quotes, backslashes, opening and closing
//! brackets) with AVX-512, AVX2 or SSE2 compares on x86_64, whichever the CPU has (a
//! portable loop elsewhere). Escapes are resolved per backslash, string interiors by a prefix XOR of the unescaped quotes, and
//! only the brackets left outside strings are walked one by one to track depth. This is
//! the first stage of simdjson reduced to what a record splitter needs; CloudTrail records
//! hold a few dozen brackets per kilobyte, so the walk is short.
//!
//! The state carried between calls (inside a string, next byte escaped, depth) lets a
//! record span any number of input chunks.

/// Scanner state at a byte position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanState {
    pub in_string: bool,
    /// The next byte is escaped by a backslash that ended the previous input.
    pub escaped: bool,
    /// Bracket depth; the record ends when it returns to zero.
    pub depth: u32,
    /// Set once the depth went over the cap (the record is still read to its end).
    pub too_deep: bool,
}

struct Masks {
    quote: u64,
    backslash: u64,
    open: u64,
    close: u64,
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks_sse2(block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of the x86_64 baseline; the loads read 4 x 16 bytes inside
    // `block`, which is 64 bytes long, and `_mm_loadu_si128` has no alignment demand.
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let lower = _mm_set1_epi8(0x20);
        // `{` and `[` differ only in bit 0x20, as do `}` and `]`.
        let open = _mm_set1_epi8(b'{' as i8);
        let close = _mm_set1_epi8(b'}' as i8);
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            open: 0,
            close: 0,
        };
        for lane in 0..4 {
            let v = _mm_loadu_si128(block.as_ptr().add(lane * 16) as *const __m128i);
            let folded = _mm_or_si128(v, lower);
            let shift = lane * 16;
            m.quote |=
                ((_mm_movemask_epi8(_mm_cmpeq_epi8(v, quote)) as u32 & 0xffff) as u64) << shift;
            m.backslash |=
                ((_mm_movemask_epi8(_mm_cmpeq_epi8(v, backslash)) as u32 & 0xffff) as u64) << shift;
            m.open |=
                ((_mm_movemask_epi8(_mm_cmpeq_epi8(folded, open)) as u32 & 0xffff) as u64) << shift;
            m.close |= ((_mm_movemask_epi8(_mm_cmpeq_epi8(folded, close)) as u32 & 0xffff) as u64)
                << shift;
        }
        m
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks_avx512(block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{
        _mm512_cmpeq_epi8_mask, _mm512_loadu_si512, _mm512_or_si512, _mm512_set1_epi8,
    };
    // SAFETY: only reached from `find_end_avx512`, which runs only when the CPU has
    // AVX-512F and AVX-512BW; the load reads the 64 bytes of `block`, unaligned loads
    // being allowed.
    unsafe {
        let v = _mm512_loadu_si512(block.as_ptr().cast());
        let folded = _mm512_or_si512(v, _mm512_set1_epi8(0x20));
        Masks {
            quote: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'"' as i8)),
            backslash: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'\\' as i8)),
            open: _mm512_cmpeq_epi8_mask(folded, _mm512_set1_epi8(b'{' as i8)),
            close: _mm512_cmpeq_epi8_mask(folded, _mm512_set1_epi8(b'}' as i8)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks_avx2(block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_or_si256,
        _mm256_set1_epi8,
    };
    // SAFETY: only reached from `find_end_avx2`, which runs only when the CPU has AVX2;
    // the loads read 2 x 32 bytes inside `block`, unaligned loads being allowed.
    unsafe {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let lower = _mm256_set1_epi8(0x20);
        let open = _mm256_set1_epi8(b'{' as i8);
        let close = _mm256_set1_epi8(b'}' as i8);
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            open: 0,
            close: 0,
        };
        for lane in 0..2 {
            let v = _mm256_loadu_si256(block.as_ptr().add(lane * 32) as *const __m256i);
            let folded = _mm256_or_si256(v, lower);
            let shift = lane * 32;
            let bits = |x| (_mm256_movemask_epi8(x) as u32 as u64) << shift;
            m.quote |= bits(_mm256_cmpeq_epi8(v, quote));
            m.backslash |= bits(_mm256_cmpeq_epi8(v, backslash));
            m.open |= bits(_mm256_cmpeq_epi8(folded, open));
            m.close |= bits(_mm256_cmpeq_epi8(folded, close));
        }
        m
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn masks_portable(block: &[u8; 64]) -> Masks {
    let mut m = Masks {
        quote: 0,
        backslash: 0,
        open: 0,
        close: 0,
    };
    for (j, &b) in block.iter().enumerate() {
        let bit = 1u64 << j;
        match b | 0x20 {
            b'{' => m.open |= bit,
            b'}' => m.close |= bit,
            _ => {}
        }
        if b == b'"' {
            m.quote |= bit;
        } else if b == b'\\' {
            m.backslash |= bit;
        }
    }
    m
}

/// Bits of the bytes escaped by a backslash; `carry` says whether bit 0 is escaped on
/// entry and, on return, whether the byte after the block is.
#[inline(always)]
fn escaped_bits(backslash: u64, carry: &mut bool, len: usize) -> u64 {
    let mut escaped = *carry as u64;
    let mut m = backslash;
    let mut next_carry = false;
    while m != 0 {
        let p = m.trailing_zeros();
        m &= m - 1;
        if escaped & (1u64 << p) != 0 {
            continue; // an escaped backslash escapes nothing
        }
        if p as usize + 1 >= len {
            next_carry = true;
        } else {
            escaped |= 1u64 << (p + 1);
        }
    }
    *carry = next_carry;
    escaped
}

/// Prefix XOR by carry-less multiplication with all ones: one instruction instead of six
/// dependent shift-and-xor steps.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefix_xor_clmul(x: u64) -> u64 {
    use std::arch::x86_64::{_mm_clmulepi64_si128, _mm_cvtsi128_si64, _mm_set_epi64x};
    // SAFETY: only reached from functions compiled with, and run only on CPUs with,
    // PCLMULQDQ (`find_end_avx512`, `find_end_avx2`).
    unsafe {
        let product = _mm_clmulepi64_si128(_mm_set_epi64x(0, x as i64), _mm_set_epi64x(0, -1), 0);
        _mm_cvtsi128_si64(product) as u64
    }
}

/// Prefix XOR: bit i is the parity of bits 0..=i.
#[inline(always)]
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// Scans `input` from the start with `state` as it stands there. Returns the offset just
/// past the bracket that brings the depth back to zero, or `None` when the input ends
/// first (then `state` holds the state at the end of `input`).
pub fn find_end(input: &[u8], state: &mut ScanState, max_depth: u32) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        // Which kernel the CPU can run, decided once per process.
        static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        let level = *LEVEL.get_or_init(|| {
            use std::arch::is_x86_feature_detected as has;
            let base = has!("popcnt") && has!("bmi1") && has!("pclmulqdq");
            if base && has!("avx512bw") {
                2
            } else if base && has!("avx2") {
                1
            } else {
                0
            }
        });
        match level {
            // SAFETY: the CPU has AVX-512F/BW (BW implies F), POPCNT, BMI1 and
            // PCLMULQDQ: `LEVEL` is 2 only then.
            2 => unsafe { find_end_avx512(input, state, max_depth) },
            // SAFETY: the CPU has AVX2, POPCNT, BMI1 and PCLMULQDQ: `LEVEL` is 1 only then.
            1 => unsafe { find_end_avx2(input, state, max_depth) },
            _ => find_end_with(input, state, max_depth, masks_sse2, prefix_xor),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    find_end_with(input, state, max_depth, masks_portable, prefix_xor)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,popcnt,bmi1,pclmulqdq")]
unsafe fn find_end_avx512(input: &[u8], state: &mut ScanState, max_depth: u32) -> Option<usize> {
    find_end_with(input, state, max_depth, masks_avx512, prefix_xor_clmul)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,bmi1,pclmulqdq")]
unsafe fn find_end_avx2(input: &[u8], state: &mut ScanState, max_depth: u32) -> Option<usize> {
    find_end_with(input, state, max_depth, masks_avx2, prefix_xor_clmul)
}

#[inline(always)]
fn find_end_with(
    input: &[u8],
    state: &mut ScanState,
    max_depth: u32,
    masks: impl Fn(&[u8; 64]) -> Masks,
    prefix_xor: impl Fn(u64) -> u64,
) -> Option<usize> {
    let mut base = 0;
    let mut padded;
    while base < input.len() {
        let len = (input.len() - base).min(64);
        let block: &[u8; 64] = match input[base..].first_chunk::<64>() {
            Some(b) => b,
            None => {
                padded = [b' '; 64];
                padded[..len].copy_from_slice(&input[base..]);
                &padded
            }
        };
        let m = masks(block);
        let mut carry = state.escaped;
        let escaped = if m.backslash == 0 && !carry {
            0
        } else {
            escaped_bits(m.backslash, &mut carry, len)
        };
        let quotes = m.quote & !escaped;
        let inside = prefix_xor(quotes) ^ if state.in_string { !0 } else { 0 };
        let outside = !inside & !escaped;
        let opens = m.open & outside;
        let closes = m.close & outside;
        let (n_open, n_close) = (opens.count_ones(), closes.count_ones());
        if state.depth > n_close && (state.too_deep || state.depth + n_open <= max_depth) {
            // The depth cannot reach zero (nor cross the cap) inside this block.
            state.depth = state.depth + n_open - n_close;
        } else {
            let mut brackets = opens | closes;
            while brackets != 0 {
                let p = brackets.trailing_zeros();
                brackets &= brackets - 1;
                if opens & (1u64 << p) != 0 {
                    state.depth += 1;
                    if state.depth > max_depth {
                        state.too_deep = true;
                    }
                } else {
                    state.depth = state.depth.saturating_sub(1);
                    if state.depth == 0 {
                        state.in_string = false;
                        state.escaped = false;
                        return Some(base + p as usize + 1);
                    }
                }
            }
        }
        state.in_string = (inside >> (len - 1)) & 1 == 1;
        state.escaped = carry;
        base += len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-at-a-time reference the block scanner must agree with.
    fn reference(input: &[u8], state: &mut ScanState, max_depth: u32) -> Option<usize> {
        for (i, &b) in input.iter().enumerate() {
            if state.escaped {
                state.escaped = false;
                continue;
            }
            if state.in_string {
                match b {
                    b'\\' => state.escaped = true,
                    b'"' => state.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'\\' => state.escaped = true,
                b'"' => state.in_string = true,
                b'{' | b'[' => {
                    state.depth += 1;
                    if state.depth > max_depth {
                        state.too_deep = true;
                    }
                }
                b'}' | b']' => {
                    state.depth = state.depth.saturating_sub(1);
                    if state.depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn agrees_with_the_byte_loop_on_random_inputs_split_anywhere() {
        let alphabet = b"{}[]\"\\\\ab:,";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..4000 {
            let n = (rng.next() % 300) as usize;
            let mut input: Vec<u8> = (0..n)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            input.insert(0, b'{');
            let start = ScanState {
                depth: 1,
                ..Default::default()
            };
            let mut want = start;
            let expected = reference(&input[1..], &mut want, 5);
            // Feed the same bytes in two pieces split at a random point.
            let split = 1 + (rng.next() as usize % input.len());
            let mut got = start;
            let first = find_end(&input[1..split], &mut got, 5);
            let result = match first {
                Some(end) => Some(end),
                None => find_end(&input[split..], &mut got, 5).map(|e| e + split - 1),
            };
            assert_eq!(
                result,
                expected,
                "case {case}: {:?}",
                String::from_utf8_lossy(&input)
            );
            #[cfg(target_arch = "x86_64")]
            {
                let mut sse = start;
                let r = find_end_with(&input[1..], &mut sse, 5, masks_sse2, prefix_xor);
                assert_eq!(r, expected, "case {case} (SSE2)");
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("popcnt")
                    && std::arch::is_x86_feature_detected!("bmi1")
                    && std::arch::is_x86_feature_detected!("pclmulqdq")
                {
                    let mut st = start;
                    // SAFETY: the features are checked just above.
                    let r = unsafe { find_end_avx2(&input[1..], &mut st, 5) };
                    assert_eq!(r, expected, "case {case} (AVX2)");
                }
            }
            if expected.is_none() {
                assert_eq!(got, want, "case {case} end state");
            } else {
                assert_eq!(got.too_deep, want.too_deep, "case {case} depth cap");
            }
        }
    }

    #[test]
    fn a_record_with_escaped_quotes_and_brackets_in_strings_ends_at_its_brace() {
        let rec = br#"{"a":"x\"}","b":{"c":"\\"},"d":"[{\\\"}"}tail"#;
        let mut st = ScanState::default();
        let end = find_end(rec, &mut st, 64);
        assert_eq!(end, Some(rec.len() - 4));
    }

    #[test]
    fn deep_nesting_costs_no_memory_and_trips_the_cap() {
        let mut doc = vec![b'['; 100_000];
        doc.extend(vec![b']'; 100_000]);
        let mut st = ScanState::default();
        assert_eq!(find_end(&doc, &mut st, 64), Some(doc.len()));
        assert!(st.too_deep);
    }
}
