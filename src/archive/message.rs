//! The AWS Encryption SDK message format, version 2, for the one algorithm suite kmsguard
//! uses: 0x0478 AES_256_GCM_HKDF_SHA512_COMMIT_KEY (key commitment, no signature), framed
//! body. Pure code over byte slices: no I/O, no KMS; the caller brings the plaintext data
//! key and the encrypted data keys.
//!
//! Layout (all integers big-endian), as in the public message-format reference:
//!
//! ```text
//! header:  version=2 (1) | suite id (2) | message id (32) | AAD length (2)
//!          | [pair count (2) | (key len (2) key value len (2) value)*]   (sorted by key)
//!          | EDK count (2) | (provider id len/bytes, provider info len/bytes, EDK len/bytes)*
//!          | content type=2 framed (1) | frame length (4) | commitment key (32)
//!          | header auth tag (16)        (AES-GCM, IV all zero, AAD = header bytes above)
//! frame:   seq (4) | IV (12) | ciphertext (frame length) | tag (16)
//! final:   0xFFFFFFFF (4) | seq (4) | IV (12) | content length (4) | ciphertext | tag (16)
//! ```
//!
//! Keys: HKDF-SHA512(salt = message id, ikm = data key): the encryption key with info
//! `suite id || "DERIVEKEY"`, the commitment key with info `"COMMITKEY"`. A frame's IV is
//! its sequence number, left-padded with zeros; its AAD is `message id || "AWSKMSEncryptionClient
//! Frame" (or "... Final Frame") || seq (4) || plaintext length (8)`.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha512;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// The only algorithm suite written and read: AES_256_GCM_HKDF_SHA512_COMMIT_KEY.
pub const SUITE_ID: u16 = 0x0478;
/// Provider id of encrypted data keys wrapped by AWS KMS.
pub const PROVIDER_AWS_KMS: &str = "aws-kms";
/// Frame length written by kmsguard (the AWS Encryption SDK's default too).
pub const DEFAULT_FRAME_LEN: u32 = 4096;

const VERSION: u8 = 2;
const CONTENT_FRAMED: u8 = 2;
const FINAL_FRAME_MARK: u32 = 0xFFFF_FFFF;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Frame";
const FINAL_FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Final Frame";
/// Reserved prefix of encryption context keys the SDK adds itself.
const RESERVED_PREFIX: &str = "aws-crypto-";

/// The encryption context: sorted by key as the format requires (Rust orders `String`s by
/// their UTF-8 bytes, which is the order the serialization uses).
pub type EncryptionContext = BTreeMap<String, String>;

/// A plaintext data key, wiped from memory when dropped.
pub type DataKey = Zeroizing<[u8; KEY_LEN]>;

/// One encrypted copy of the data key, as stored in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedDataKey {
    pub provider_id: String,
    /// For `aws-kms`: the KMS key ARN, UTF-8.
    pub provider_info: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// What is wrong with a message. The caller adds which segment or file it was.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("truncated: the message ends inside the {0}")]
    Truncated(&'static str),
    #[error("message format version {0} is not supported (only version 2 is)")]
    UnsupportedVersion(u8),
    #[error(
        "algorithm suite 0x{0:04x} is not supported: encrypt with --algorithm AES_256_GCM_HKDF_SHA512_COMMIT_KEY (0x0478, committing, unsigned)"
    )]
    UnsupportedSuite(u16),
    #[error("content type {0} is not supported (only framed bodies are)")]
    UnsupportedContentType(u8),
    #[error("frame length {0} is not usable")]
    BadFrameLength(u32),
    #[error("encryption context: {0}")]
    BadContext(String),
    #[error("a header field is too long for the format: {0}")]
    TooLong(&'static str),
    #[error("the message has no encrypted data key")]
    NoDataKey,
    #[error("key commitment does not match: wrong data key, or the header was altered")]
    CommitmentMismatch,
    #[error("header authentication failed: the header was altered")]
    HeaderAuth,
    #[error("frame {0} failed authentication: the body was altered or frames were reordered")]
    FrameAuth(u32),
    #[error("frame {found} found where frame {expected} was expected")]
    FrameOrder { expected: u32, found: u32 },
    #[error("final frame is longer ({0} bytes) than the frame length")]
    FinalFrameTooLong(u32),
    #[error("{0} unexpected bytes after the final frame")]
    TrailingBytes(usize),
    #[error("the message would have too many frames")]
    TooManyFrames,
    #[error("bad data key length {0} (expected 32 bytes)")]
    BadKeyLength(usize),
}

/// A parsed header. `body_offset` is where the first frame starts.
#[derive(Debug, Clone)]
pub struct Header {
    pub message_id: [u8; 32],
    pub context: EncryptionContext,
    pub data_keys: Vec<EncryptedDataKey>,
    pub frame_len: u32,
    commitment: [u8; 32],
    auth_tag: [u8; TAG_LEN],
    /// Length of the header bytes that the auth tag covers.
    authed_len: usize,
    pub body_offset: usize,
}

/// A reader over a byte slice that names what was cut short.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(FormatError::Truncated(what))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FormatError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn str16(&mut self, what: &'static str) -> Result<String, FormatError> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| FormatError::BadContext(format!("{what} is not UTF-8")))
    }
    fn bytes16(&mut self, what: &'static str) -> Result<Vec<u8>, FormatError> {
        let n = self.u16(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
}

fn put16(out: &mut Vec<u8>, bytes: &[u8], what: &'static str) -> Result<(), FormatError> {
    let n = u16::try_from(bytes.len()).map_err(|_| FormatError::TooLong(what))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Serializes an encryption context as the format requires (empty: no bytes at all).
pub fn serialize_context(context: &EncryptionContext) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    if context.is_empty() {
        return Ok(out);
    }
    let count = u16::try_from(context.len()).map_err(|_| FormatError::TooLong("context"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (k, v) in context {
        if k.is_empty() {
            return Err(FormatError::BadContext("empty key".into()));
        }
        put16(&mut out, k.as_bytes(), "context key")?;
        put16(&mut out, v.as_bytes(), "context value")?;
    }
    if out.len() > u16::MAX as usize {
        return Err(FormatError::TooLong("context"));
    }
    Ok(out)
}

fn parse_context(bytes: &[u8]) -> Result<EncryptionContext, FormatError> {
    let mut ctx = EncryptionContext::new();
    if bytes.is_empty() {
        return Ok(ctx);
    }
    let mut c = Cursor { bytes, pos: 0 };
    let count = c.u16("encryption context")?;
    if count == 0 {
        return Err(FormatError::BadContext(
            "a non-empty context with zero pairs".into(),
        ));
    }
    let mut last: Option<String> = None;
    for _ in 0..count {
        let k = c.str16("encryption context key")?;
        let v = c.str16("encryption context value")?;
        if last.as_ref().is_some_and(|l| *l >= k) {
            return Err(FormatError::BadContext(format!(
                "key {k:?} is duplicated or out of order"
            )));
        }
        last = Some(k.clone());
        ctx.insert(k, v);
    }
    if c.pos != bytes.len() {
        return Err(FormatError::BadContext(
            "bytes left after the last pair".into(),
        ));
    }
    Ok(ctx)
}

/// The message's encryption key and commitment key, derived from the data key.
struct Keys {
    cipher: Aes256Gcm,
    commitment: Zeroizing<[u8; 32]>,
}

fn derive(data_key: &[u8; KEY_LEN], message_id: &[u8; 32]) -> Result<Keys, FormatError> {
    let hk = Hkdf::<Sha512>::new(Some(message_id), data_key);
    let mut enc = Zeroizing::new([0u8; KEY_LEN]);
    let mut info = [0u8; 11];
    info[..2].copy_from_slice(&SUITE_ID.to_be_bytes());
    info[2..].copy_from_slice(b"DERIVEKEY");
    let mut commitment = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA512's limit (255 * 64), so neither expand can fail.
    hk.expand(&info, enc.as_mut())
        .and_then(|_| hk.expand(b"COMMITKEY", commitment.as_mut()))
        .map_err(|_| FormatError::BadKeyLength(KEY_LEN))?;
    let cipher =
        Aes256Gcm::new_from_slice(enc.as_ref()).map_err(|_| FormatError::BadKeyLength(KEY_LEN))?;
    Ok(Keys { cipher, commitment })
}

fn frame_iv(seq: u32) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut iv = [0u8; IV_LEN];
    iv[8..].copy_from_slice(&seq.to_be_bytes());
    iv.into()
}

fn body_aad(message_id: &[u8; 32], fin: bool, seq: u32, len: u64) -> Vec<u8> {
    let label = if fin { FINAL_FRAME_AAD } else { FRAME_AAD };
    let mut aad = Vec::with_capacity(32 + label.len() + 12);
    aad.extend_from_slice(message_id);
    aad.extend_from_slice(label);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(&len.to_be_bytes());
    aad
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encrypts `plaintext` into a complete message.
pub fn encrypt(
    data_key: &[u8; KEY_LEN],
    message_id: [u8; 32],
    context: &EncryptionContext,
    data_keys: &[EncryptedDataKey],
    frame_len: u32,
    plaintext: &[u8],
) -> Result<Vec<u8>, FormatError> {
    if frame_len == 0 {
        return Err(FormatError::BadFrameLength(frame_len));
    }
    if data_keys.is_empty() {
        return Err(FormatError::NoDataKey);
    }
    if let Some(k) = context.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
        return Err(FormatError::BadContext(format!(
            "key {k:?} uses the reserved prefix {RESERVED_PREFIX}"
        )));
    }
    let keys = derive(data_key, &message_id)?;
    // Full frames, then a final frame shorter than a frame (empty when the plaintext is an
    // exact multiple): the Python SDK, and so aws-encryption-cli, refuses a full-size final
    // frame although the format allows it.
    let full = plaintext.len() / frame_len as usize;
    let frames = full + 1;
    if frames >= FINAL_FRAME_MARK as usize {
        return Err(FormatError::TooManyFrames);
    }
    let mut out = Vec::with_capacity(plaintext.len() + 512 + frames * (4 + IV_LEN + TAG_LEN) + 8);
    out.push(VERSION);
    out.extend_from_slice(&SUITE_ID.to_be_bytes());
    out.extend_from_slice(&message_id);
    let ctx = serialize_context(context)?;
    put16(&mut out, &ctx, "encryption context")?;
    let n = u16::try_from(data_keys.len()).map_err(|_| FormatError::TooLong("data keys"))?;
    out.extend_from_slice(&n.to_be_bytes());
    for k in data_keys {
        put16(&mut out, k.provider_id.as_bytes(), "provider id")?;
        put16(&mut out, &k.provider_info, "provider info")?;
        put16(&mut out, &k.ciphertext, "encrypted data key")?;
    }
    out.push(CONTENT_FRAMED);
    out.extend_from_slice(&frame_len.to_be_bytes());
    out.extend_from_slice(keys.commitment.as_ref());
    let tag = keys
        .cipher
        .encrypt_inout_detached(&[0u8; IV_LEN].into(), &out, (&mut [][..]).into())
        .map_err(|_| FormatError::HeaderAuth)?;
    out.extend_from_slice(&tag);

    let (body, rest) = plaintext.split_at(full * frame_len as usize);
    let chunks = body
        .chunks(frame_len as usize)
        .map(|c| (c, false))
        .chain(std::iter::once((rest, true)));
    for (seq, (chunk, fin)) in (1u32..).zip(chunks) {
        if fin {
            out.extend_from_slice(&FINAL_FRAME_MARK.to_be_bytes());
        }
        out.extend_from_slice(&seq.to_be_bytes());
        let iv = frame_iv(seq);
        out.extend_from_slice(&iv);
        if fin {
            // chunk.len() < frame_len, a u32.
            out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        }
        let start = out.len();
        out.extend_from_slice(chunk);
        let aad = body_aad(&message_id, fin, seq, chunk.len() as u64);
        let tag = keys
            .cipher
            .encrypt_inout_detached(&iv, &aad, (&mut out[start..]).into())
            .map_err(|_| FormatError::FrameAuth(seq))?;
        out.extend_from_slice(&tag);
    }
    Ok(out)
}

/// Parses the header without any key (list, and choosing a data key to unwrap).
pub fn parse_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let mut c = Cursor { bytes, pos: 0 };
    let version = c.u8("version")?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let suite = c.u16("algorithm suite")?;
    if suite != SUITE_ID {
        return Err(FormatError::UnsupportedSuite(suite));
    }
    let message_id = c.array::<32>("message id")?;
    let ctx_len = c.u16("encryption context length")? as usize;
    let context = parse_context(c.take(ctx_len, "encryption context")?)?;
    let n = c.u16("encrypted data key count")?;
    if n == 0 {
        return Err(FormatError::NoDataKey);
    }
    let mut data_keys = Vec::with_capacity(n as usize);
    for _ in 0..n {
        data_keys.push(EncryptedDataKey {
            provider_id: c.str16("provider id")?,
            provider_info: c.bytes16("provider info")?,
            ciphertext: c.bytes16("encrypted data key")?,
        });
    }
    let content_type = c.u8("content type")?;
    if content_type != CONTENT_FRAMED {
        return Err(FormatError::UnsupportedContentType(content_type));
    }
    let frame_len = c.u32("frame length")?;
    if frame_len == 0 || frame_len > i32::MAX as u32 {
        return Err(FormatError::BadFrameLength(frame_len));
    }
    let commitment = c.array::<32>("commitment key")?;
    let authed_len = c.pos;
    let auth_tag = c.array::<TAG_LEN>("header authentication tag")?;
    Ok(Header {
        message_id,
        context,
        data_keys,
        frame_len,
        commitment,
        auth_tag,
        authed_len,
        body_offset: c.pos,
    })
}

/// Decrypts a whole message with its plaintext data key: checks the key commitment, the
/// header authentication tag and every frame (order, lengths, tags, nothing after the
/// final frame).
pub fn decrypt(data_key: &[u8], bytes: &[u8]) -> Result<(Header, Vec<u8>), FormatError> {
    let data_key: &[u8; KEY_LEN] = data_key
        .try_into()
        .map_err(|_| FormatError::BadKeyLength(data_key.len()))?;
    let header = parse_header(bytes)?;
    let keys = derive(data_key, &header.message_id)?;
    if !ct_eq(keys.commitment.as_ref(), &header.commitment) {
        return Err(FormatError::CommitmentMismatch);
    }
    keys.cipher
        .decrypt_inout_detached(
            &[0u8; IV_LEN].into(),
            &bytes[..header.authed_len],
            (&mut [][..]).into(),
            &Tag::from(header.auth_tag),
        )
        .map_err(|_| FormatError::HeaderAuth)?;

    let mut c = Cursor {
        bytes,
        pos: header.body_offset,
    };
    let mut plaintext = Vec::with_capacity(bytes.len().saturating_sub(header.body_offset));
    let mut expected: u32 = 1;
    loop {
        let first = c.u32("frame sequence number")?;
        let fin = first == FINAL_FRAME_MARK;
        let seq = if fin {
            c.u32("final frame sequence number")?
        } else {
            first
        };
        if seq != expected {
            return Err(FormatError::FrameOrder {
                expected,
                found: seq,
            });
        }
        let iv = c.array::<IV_LEN>("frame IV")?;
        if iv != <[u8; IV_LEN]>::from(frame_iv(seq)) {
            return Err(FormatError::FrameAuth(seq));
        }
        let len = if fin {
            let l = c.u32("final frame length")?;
            if l > header.frame_len {
                return Err(FormatError::FinalFrameTooLong(l));
            }
            l
        } else {
            header.frame_len
        };
        let ct = c.take(len as usize, "frame content")?;
        let tag = c.array::<TAG_LEN>("frame tag")?;
        let start = plaintext.len();
        plaintext.extend_from_slice(ct);
        let aad = body_aad(&header.message_id, fin, seq, len as u64);
        keys.cipher
            .decrypt_inout_detached(
                &iv.into(),
                &aad,
                (&mut plaintext[start..]).into(),
                &Tag::from(tag),
            )
            .map_err(|_| FormatError::FrameAuth(seq))?;
        if fin {
            break;
        }
        expected = expected.checked_add(1).ok_or(FormatError::TooManyFrames)?;
        if expected == FINAL_FRAME_MARK {
            return Err(FormatError::TooManyFrames);
        }
    }
    if c.pos != bytes.len() {
        return Err(FormatError::TrailingBytes(bytes.len() - c.pos));
    }
    Ok((header, plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edk() -> Vec<EncryptedDataKey> {
        vec![EncryptedDataKey {
            provider_id: PROVIDER_AWS_KMS.into(),
            provider_info: b"arn:aws:kms:us-east-1:111122223333:key/k".to_vec(),
            ciphertext: vec![7; 40],
        }]
    }

    fn ctx() -> EncryptionContext {
        [("purpose", "alerts"), ("a", "1"), ("zz", "é")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trips_at_every_frame_boundary() {
        let key = [3u8; 32];
        for len in [0usize, 1, 15, 16, 17, 32, 33, 100] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let msg = encrypt(&key, [9; 32], &ctx(), &edk(), 16, &pt).unwrap();
            let (h, back) = decrypt(&key, &msg).unwrap();
            assert_eq!(back, pt, "length {len}");
            assert_eq!(h.context, ctx());
            assert_eq!(h.data_keys, edk());
            assert_eq!(h.frame_len, 16);
        }
    }

    #[test]
    fn an_exact_multiple_ends_with_an_empty_final_frame() {
        let key = [3u8; 32];
        let msg = encrypt(&key, [9; 32], &ctx(), &edk(), 16, &[1u8; 32]).unwrap();
        let h = parse_header(&msg).unwrap();
        // Two full frames (4 + 12 + 16 + 16 bytes each), then the final frame header.
        let fin = h.body_offset + 2 * 48;
        assert_eq!(&msg[fin..fin + 8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 3]);
        assert_eq!(
            &msg[fin + 20..fin + 24],
            &[0, 0, 0, 0],
            "final frame not empty"
        );
        assert_eq!(msg.len(), fin + 24 + 16);
    }

    #[test]
    fn header_layout_follows_the_format() {
        let msg = encrypt(&[1; 32], [2; 32], &ctx(), &edk(), 4096, b"x").unwrap();
        assert_eq!(msg[0], 2);
        assert_eq!(&msg[1..3], &[0x04, 0x78]);
        assert_eq!(&msg[3..35], &[2u8; 32]);
        let ctx_bytes = serialize_context(&ctx()).unwrap();
        assert_eq!(
            u16::from_be_bytes([msg[35], msg[36]]) as usize,
            ctx_bytes.len()
        );
        // Pair count, then pairs sorted by key bytes: "a" < "purpose" < "zz".
        assert_eq!(&ctx_bytes[..2], &[0, 3]);
        assert_eq!(&ctx_bytes[2..7], &[0, 1, b'a', 0, 1]);
        assert!(serialize_context(&EncryptionContext::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let key = [5u8; 32];
        let msg = encrypt(&key, [6; 32], &ctx(), &edk(), 8, b"some alert lines\n").unwrap();
        for i in 0..msg.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = msg.clone();
                bad[i] ^= bit;
                assert!(
                    decrypt(&key, &bad).is_err(),
                    "flip at byte {i} not detected"
                );
            }
        }
    }

    #[test]
    fn wrong_key_fails_on_commitment() {
        let msg = encrypt(&[1; 32], [2; 32], &ctx(), &edk(), 16, b"hello").unwrap();
        assert_eq!(
            decrypt(&[4; 32], &msg).unwrap_err(),
            FormatError::CommitmentMismatch
        );
    }

    #[test]
    fn truncation_and_trailing_bytes_are_detected() {
        let key = [1u8; 32];
        let msg = encrypt(&key, [2; 32], &ctx(), &edk(), 16, &[0u8; 40]).unwrap();
        for cut in 0..msg.len() {
            assert!(decrypt(&key, &msg[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = msg.clone();
        long.push(0);
        assert_eq!(
            decrypt(&key, &long).unwrap_err(),
            FormatError::TrailingBytes(1)
        );
    }

    #[test]
    fn other_suites_and_reserved_keys_are_refused() {
        let mut msg = encrypt(&[1; 32], [2; 32], &ctx(), &edk(), 16, b"x").unwrap();
        msg[1..3].copy_from_slice(&0x0578u16.to_be_bytes());
        assert_eq!(
            parse_header(&msg).unwrap_err(),
            FormatError::UnsupportedSuite(0x0578)
        );
        let mut c = ctx();
        c.insert("aws-crypto-public-key".into(), "x".into());
        assert!(matches!(
            encrypt(&[1; 32], [2; 32], &c, &edk(), 16, b"x"),
            Err(FormatError::BadContext(_))
        ));
    }

    /// Known-answer check of the key schedule against RFC 5869's SHA-512 construction,
    /// computed independently with HMAC (so a mix-up of salt and ikm would show).
    #[test]
    fn key_derivation_uses_message_id_as_salt() {
        use hkdf::hmac::{KeyInit, Mac};
        type H = hkdf::hmac::Hmac<Sha512>;
        let (dk, mid) = ([0x11u8; 32], [0x22u8; 32]);
        let mut m = <H as KeyInit>::new_from_slice(&mid).unwrap();
        m.update(&dk);
        let prk = m.finalize().into_bytes();
        let mut m = <H as KeyInit>::new_from_slice(&prk).unwrap();
        m.update(b"COMMITKEY");
        m.update(&[1]);
        let t1 = m.finalize().into_bytes();
        assert_eq!(&derive(&dk, &mid).unwrap().commitment[..], &t1[..32]);
    }
}
