//! GGUF tensor data: the blocks of each ggml type turned into what MLX holds.
//!
//! - F32, F16, BF16: as stored.
//! - Every quantized type: affine quantization (`w = scale * q + bias` per
//!   group), values packed as MLX packs them: a little-endian bit stream
//!   per row (`bits` u32 words per 32 values).
//!   - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and Q4_K, Q5_K (256 in 8
//!     sub-blocks of 32): group 32, 4, 5 or 8 bits, MLX's own layout.
//!   - Q2_K, Q3_K, Q6_K (256 in 16 sub-blocks of 16): group 16 at 2, 3 or 6
//!     bits. MLX has no group of 16: lmspec's CPU kernels run these, and
//!     elsewhere the engine expands them to float32 at load.
//!
//!   Scales and biases are exact: float16 for the 32-blocks (`d`, and `m`
//!   or `-8d`, `-16d`, `-128d`: a power of two times `d`; a tensor whose
//!   product overflows float16 keeps float32 instead), float32 for the
//!   K-quants (`d * sc` and `-dmin * m` need up to 18 significant bits).
//!   Each value `scale * q + bias` equals the reference's (`gguf.quants`)
//!   bit for bit, but for the sign of a zero where the reference computes
//!   `d * (q - k)` (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K): -0.0 there, +0.0 here.
//!
//! Every other type is an error naming the tensor and the type. Sizes come
//! from the header, which [`crate::gguf::check`] has held to the file.
use half::{bf16, f16};

use crate::gguf::TensorInfo;
use crate::FormatError;

/// Values packed at a time: a whole number of u32 words at every width.
const PACK: usize = 32;

/// How a ggml type is held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// F32, F16, BF16: the stored values.
    AsStored,
    /// Affine quantization at these bits, in groups of `group` values.
    Affine { bits: u32, group: usize },
}

/// How `type_name` (ggml's spelling) is held, or `None` when it is not read.
pub fn holding(type_name: &str) -> Option<Holding> {
    Some(match type_name {
        "F32" | "F16" | "BF16" => Holding::AsStored,
        "Q4_0" | "Q4_1" | "Q4_K" => Holding::Affine { bits: 4, group: 32 },
        "Q5_0" | "Q5_1" | "Q5_K" => Holding::Affine { bits: 5, group: 32 },
        "Q8_0" => Holding::Affine { bits: 8, group: 32 },
        "Q2_K" => Holding::Affine { bits: 2, group: 16 },
        "Q3_K" => Holding::Affine { bits: 3, group: 16 },
        "Q6_K" => Holding::Affine { bits: 6, group: 16 },
        _ => return None,
    })
}

/// The types [`Decoder`] reads, in ggml's order.
pub const SUPPORTED: [&str; 13] = [
    "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "BF16",
];

/// Scales or biases of an affine tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Floats {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Floats {
    pub fn len(&self) -> usize {
        match self {
            Floats::F16(v) => v.len(),
            Floats::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn promote(&mut self) {
        if let Floats::F16(v) = self {
            *self = Floats::F32(v.iter().map(|x| x.to_f32()).collect());
        }
    }

    fn push(&mut self, x: f32) {
        match self {
            Floats::F16(v) => v.push(f16::from_f32(x)),
            Floats::F32(v) => v.push(x),
        }
    }
}

/// A tensor's data as MLX will hold it; shapes in MLX order (outermost first).
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    /// Groups of `group` values; `packed` has `bits` words per 32 values.
    Affine {
        bits: u32,
        group: usize,
        packed: Vec<u32>,
        scales: Floats,
        biases: Floats,
    },
}

impl Decoded {
    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            Decoded::F32(v) => v.len() * 4,
            Decoded::F16(v) => v.len() * 2,
            Decoded::Bf16(v) => v.len() * 2,
            Decoded::Affine {
                packed,
                scales,
                biases,
                ..
            } => {
                let f = |s: &Floats| match s {
                    Floats::F16(v) => v.len() * 2,
                    Floats::F32(v) => v.len() * 4,
                };
                packed.len() * 4 + f(scales) + f(biases)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Kind {
    fn of(type_name: &str) -> Option<Kind> {
        Some(match type_name {
            "F32" => Kind::F32,
            "F16" => Kind::F16,
            "BF16" => Kind::Bf16,
            "Q4_0" => Kind::Q4_0,
            "Q4_1" => Kind::Q4_1,
            "Q5_0" => Kind::Q5_0,
            "Q5_1" => Kind::Q5_1,
            "Q8_0" => Kind::Q8_0,
            "Q2_K" => Kind::Q2K,
            "Q3_K" => Kind::Q3K,
            "Q4_K" => Kind::Q4K,
            "Q5_K" => Kind::Q5K,
            "Q6_K" => Kind::Q6K,
            _ => return None,
        })
    }

    /// Elements and bytes per block.
    fn block(self) -> (usize, usize) {
        match self {
            Kind::F32 => (1, 4),
            Kind::F16 | Kind::Bf16 => (1, 2),
            Kind::Q4_0 => (32, 18),
            Kind::Q4_1 => (32, 20),
            Kind::Q5_0 => (32, 22),
            Kind::Q5_1 => (32, 24),
            Kind::Q8_0 => (32, 34),
            Kind::Q2K => (256, 84),
            Kind::Q3K => (256, 110),
            Kind::Q4K => (256, 144),
            Kind::Q5K => (256, 176),
            Kind::Q6K => (256, 210),
        }
    }
}

/// Decodes one tensor's data, fed in whole blocks.
#[derive(Debug)]
pub struct Decoder {
    node: String,
    type_name: &'static str,
    kind: Kind,
    blocks_left: usize,
    out: Decoded,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Packs 32 values of `bits` bits as MLX does: a little-endian bit stream.
fn pack(q: &[u8], bits: u32, out: &mut Vec<u32>) {
    debug_assert_eq!(q.len(), PACK);
    let mut acc: u64 = 0;
    let mut have = 0u32;
    for &v in q {
        acc |= u64::from(v) << have;
        have += bits;
        if have >= 32 {
            out.push(acc as u32);
            acc >>= 32;
            have -= 32;
        }
    }
}

/// Q4_K / Q5_K 6-bit scales and mins of the 8 sub-blocks.
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        m[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, m)
}

impl Decoder {
    /// A decoder for `t`, or an error naming the tensor and its type when
    /// the type is not read or the shape does not fit it.
    pub fn new(t: &TensorInfo) -> Result<Decoder, FormatError> {
        let node = format!("tensor '{}'", t.name.escape_debug());
        let Some(kind) = Kind::of(t.type_name) else {
            return Err(FormatError::new(
                node,
                "type",
                format!(
                    "{} (ggml type {}) is not supported (supported: {})",
                    t.type_name,
                    t.ggml_type,
                    SUPPORTED.join(", ")
                ),
            ));
        };
        let (block, block_bytes) = kind.block();
        let fail = |msg: String| FormatError::new(node.clone(), "dims", msg);
        let d0 = *t.dims.first().ok_or_else(|| fail("no dimensions".into()))?;
        if d0 % block as u64 != 0 {
            return Err(fail(format!(
                "{d0} is not a multiple of the {} block size {block}",
                t.type_name
            )));
        }
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| fail(format!("{:?} overflows", t.dims)))?;
        let blocks = n / block as u64;
        if blocks.checked_mul(block_bytes as u64) != Some(t.bytes) {
            return Err(FormatError::new(
                node,
                "data",
                format!(
                    "{} bytes, but {:?} of {} takes {} blocks of {block_bytes} bytes",
                    t.bytes, t.dims, t.type_name, blocks
                ),
            ));
        }
        let blocks = usize::try_from(blocks).map_err(|_| fail("too large".into()))?;
        // The byte count is within the file (the header check), so these
        // capacities are at most a small multiple of the file's size.
        let n = blocks * block;
        let out = match kind {
            Kind::F32 => Decoded::F32(Vec::with_capacity(n)),
            Kind::F16 => Decoded::F16(Vec::with_capacity(n)),
            Kind::Bf16 => Decoded::Bf16(Vec::with_capacity(n)),
            _ => {
                let Some(Holding::Affine { bits, group }) = holding(t.type_name) else {
                    return Err(fail("internal: no affine layout".into()));
                };
                let groups = n / group;
                let f16s = block == PACK;
                let floats = || {
                    if f16s {
                        Floats::F16(Vec::with_capacity(groups))
                    } else {
                        Floats::F32(Vec::with_capacity(groups))
                    }
                };
                Decoded::Affine {
                    bits,
                    group,
                    packed: Vec::with_capacity(n / PACK * bits as usize),
                    scales: floats(),
                    biases: floats(),
                }
            }
        };
        Ok(Decoder {
            node,
            type_name: t.type_name,
            kind,
            blocks_left: blocks,
            out,
        })
    }

    /// Bytes per block: feed [`Decoder::push`] whole multiples of it.
    pub fn block_bytes(&self) -> usize {
        self.kind.block().1
    }

    /// Blocks still expected.
    pub fn blocks_left(&self) -> usize {
        self.blocks_left
    }

    fn fail(&self, msg: String) -> FormatError {
        FormatError::new(self.node.clone(), "data", msg)
    }

    /// Decodes `data`, whole blocks only, no more than the tensor holds.
    pub fn push(&mut self, data: &[u8]) -> Result<(), FormatError> {
        let bb = self.block_bytes();
        if data.len() % bb != 0 {
            return Err(self.fail(format!(
                "{} bytes is not a whole number of {}-byte {} blocks",
                data.len(),
                bb,
                self.type_name
            )));
        }
        let n = data.len() / bb;
        if n > self.blocks_left {
            return Err(self.fail(format!("{n} blocks given, {} expected", self.blocks_left)));
        }
        self.blocks_left -= n;
        let kind = self.kind;
        match &mut self.out {
            Decoded::F32(v) => v.extend(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Decoded::F16(v) => v.extend(
                data.chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
            ),
            Decoded::Bf16(v) => v.extend(
                data.chunks_exact(2)
                    .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
            ),
            Decoded::Affine {
                bits,
                packed,
                scales,
                biases,
                ..
            } => {
                let bits = *bits;
                let mut q = [0u8; PACK];
                let mut sixteens = [0u8; 256];
                for b in data.chunks_exact(bb) {
                    match kind {
                        Kind::Q2K | Kind::Q3K | Kind::Q6K => {
                            let f = match kind {
                                Kind::Q2K => q2_k,
                                Kind::Q3K => q3_k,
                                _ => q6_k,
                            };
                            for (s, m) in f(b, &mut sixteens) {
                                scales.push(s);
                                biases.push(m);
                            }
                            for c in sixteens.chunks_exact(PACK) {
                                pack(c, bits, packed);
                            }
                        }
                        Kind::Q4K | Kind::Q5K => {
                            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                            let (sc, m) = scale_min_k4(&b[4..16]);
                            let (qh, qs) = if kind == Kind::Q5K {
                                (Some(&b[16..48]), &b[48..176])
                            } else {
                                (None, &b[16..144])
                            };
                            for j in 0..8 {
                                // Sub-block j: nibble j % 2 of 32 bytes (j / 2).
                                let (c, s) = (j / 2, 4 * (j % 2));
                                for (l, x) in q.iter_mut().enumerate() {
                                    let lo = (qs[c * 32 + l] >> s) & 0x0F;
                                    let hi = qh.map_or(0, |h| (h[l] >> j) & 1);
                                    *x = lo | (hi << 4);
                                }
                                pack(&q, bits, packed);
                                scales.push(d * f32::from(sc[j]));
                                biases.push(-(dmin * f32::from(m[j])));
                            }
                        }
                        _ => {
                            let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                            let (bias, rest): (Option<f32>, &[u8]) = match kind {
                                Kind::Q4_0 => {
                                    nibbles(&b[2..18], None, &mut q);
                                    (None, &[])
                                }
                                Kind::Q4_1 => {
                                    nibbles(&b[4..20], None, &mut q);
                                    (Some(f16_at(b, 2)), &[])
                                }
                                Kind::Q5_0 => {
                                    nibbles(&b[6..22], Some(&b[2..6]), &mut q);
                                    (None, &[])
                                }
                                Kind::Q5_1 => {
                                    nibbles(&b[8..24], Some(&b[4..8]), &mut q);
                                    (Some(f16_at(b, 2)), &[])
                                }
                                _ => (None, &b[2..34]),
                            };
                            // Q8_0: signed bytes as unsigned with bias -128d.
                            for (x, &y) in q.iter_mut().zip(rest) {
                                *x = y ^ 0x80;
                            }
                            let bias = bias.unwrap_or_else(|| {
                                let k = match kind {
                                    Kind::Q4_0 => 8.0,
                                    Kind::Q5_0 => 16.0,
                                    _ => 128.0,
                                };
                                -k * d.to_f32()
                            });
                            pack(&q, bits, packed);
                            // A power of two times d is exact in float16
                            // unless it overflows; then the tensor goes f32.
                            if let Floats::F16(_) = biases {
                                let back = f16::from_f32(bias).to_f32();
                                if back.to_bits() != bias.to_bits() {
                                    scales.promote();
                                    biases.promote();
                                }
                            }
                            scales.push(d.to_f32());
                            biases.push(bias);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The decoded tensor; fails when blocks are missing.
    pub fn finish(self) -> Result<Decoded, FormatError> {
        if self.blocks_left != 0 {
            return Err(self.fail(format!(
                "the data ends {} {} blocks early",
                self.blocks_left, self.type_name
            )));
        }
        Ok(self.out)
    }
}

/// 32 values: low nibbles of `qs` then high nibbles, plus bit i of the
/// little-endian `qh` word as bit 4 when given.
fn nibbles(qs: &[u8], qh: Option<&[u8]>, q: &mut [u8; PACK]) {
    let h = qh.map_or(0, |h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
    for (i, x) in q.iter_mut().enumerate() {
        let lo = (qs[i % 16] >> (4 * (i / 16))) & 0x0F;
        let hi = ((h >> i) & 1) as u8;
        *x = lo | (hi << 4);
    }
}

/// The 16 (scale, bias) pairs of a 256-value K-quant block with sub-blocks
/// of 16.
type Sixteen = [(f32, f32); 16];

/// Q2_K: scales[16] (4-bit scale, 4-bit min), qs[64], d, dmin:
/// `d * sc * q - dmin * m`.
fn q2_k(b: &[u8], q: &mut [u8; 256]) -> Sixteen {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (e, x) in q.iter_mut().enumerate() {
        let (half, s, l) = (e / 128, (e / 32) % 4, e % 32);
        *x = (qs[half * 32 + l] >> (2 * s)) & 3;
    }
    std::array::from_fn(|i| {
        let sc = scales[i];
        (d * f32::from(sc & 0x0F), -(dmin * f32::from(sc >> 4)))
    })
}

/// Q3_K: hmask[32], qs[64], scales[12] (6-bit, offset 32), d:
/// `d * (sc - 32) * (q - 4)`.
fn q3_k(b: &[u8], q: &mut [u8; 256]) -> Sixteen {
    let (hmask, qs, s) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    for (e, x) in q.iter_mut().enumerate() {
        let (half, sh, l) = (e / 128, (e / 32) % 4, e % 32);
        let lo = (qs[half * 32 + l] >> (2 * sh)) & 3;
        let hi = (hmask[e % 32] >> (e / 32)) & 1;
        *x = lo | (hi << 2);
    }
    std::array::from_fn(|i| {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        let dl = d * f32::from(((lo | (hi << 4)) as i8).wrapping_sub(32));
        (dl, -4.0 * dl)
    })
}

/// Q6_K: ql[128], qh[64], scales[16] (i8), d: `d * sc * (q - 32)`.
fn q6_k(b: &[u8], q: &mut [u8; 256]) -> Sixteen {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (e, x) in q.iter_mut().enumerate() {
        let half = e / 128;
        let (s4, t) = ((e % 128) / 64, e % 64);
        let lo = (ql[half * 64 + t] >> (4 * s4)) & 0x0F;
        let (s2, l) = ((e % 128) / 32, e % 32);
        let hi = (qh[half * 32 + l] >> (2 * s2)) & 3;
        *x = lo | (hi << 4);
    }
    std::array::from_fn(|i| {
        let dl = d * f32::from(sc[i] as i8);
        (dl, -32.0 * dl)
    })
}

/// Decodes a whole tensor from its bytes (`t.bytes` of them).
pub fn decode(t: &TensorInfo, data: &[u8]) -> Result<Decoded, FormatError> {
    let mut d = Decoder::new(t)?;
    let expected = d.blocks_left() * d.block_bytes();
    if data.len() != expected {
        return Err(d.fail(format!(
            "{} bytes of data, {:?} of {} takes {expected}",
            data.len(),
            t.dims,
            t.type_name
        )));
    }
    d.push(data)?;
    d.finish()
}

/// The element values as float32 the way MLX computes them from
/// [`Decoded`] (`scale * q + bias` in float32): for tests and tools.
pub fn to_f32(d: &Decoded) -> Vec<f32> {
    match d {
        Decoded::F32(v) => v.clone(),
        Decoded::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        Decoded::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        Decoded::Affine {
            bits,
            group,
            packed,
            scales,
            biases,
        } => {
            let f = |s: &Floats, i: usize| match s {
                Floats::F16(v) => v[i].to_f32(),
                Floats::F32(v) => v[i],
            };
            let bits = *bits as usize;
            let mut out = Vec::with_capacity(scales.len() * group);
            for (c, words) in packed.chunks_exact(bits).enumerate() {
                for i in 0..PACK {
                    let g = (c * PACK + i) / group;
                    let (s, b) = (f(scales, g), f(biases, g));
                    let (bit, mask) = (i * bits, (1u64 << bits) - 1);
                    let (w, o) = (bit / 32, bit % 32);
                    let lo = u64::from(words[w]) >> o;
                    let hi = words.get(w + 1).map_or(0, |&x| u64::from(x) << (32 - o));
                    let q = ((lo | hi) & mask) as f32;
                    out.push(s * q + b);
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::ggml_type_info;

    fn info(ggml_type: u32, dims: Vec<u64>) -> TensorInfo {
        let (type_name, block, block_bytes) = ggml_type_info(ggml_type).unwrap_or(("?", 1, 1));
        let n: u64 = dims.iter().product();
        TensorInfo {
            name: "blk.0.w.weight".into(),
            ggml_type,
            type_name,
            dims,
            offset: 0,
            bytes: n / block * block_bytes,
        }
    }

    fn err(r: Result<Decoded, FormatError>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unsupported_types_name_tensor_and_type() {
        for (id, name) in [(16, "IQ2_XXS"), (9, "Q8_1"), (15, "Q8_K"), (39, "MXFP4")] {
            let t = info(id, vec![256]);
            let e = err(decode(&t, &vec![0; t.bytes as usize]));
            assert!(e.contains("blk.0.w.weight") && e.contains(name), "{e}");
        }
    }

    #[test]
    fn sizes_that_disagree_with_the_shape_fail() {
        let t = info(12, vec![256, 2]);
        // Truncated by one byte, by one block; one block too many.
        for n in [287usize, 144, 432] {
            let e = err(decode(&t, &vec![0; n]));
            assert!(e.contains("blk.0.w.weight") && e.contains("Q4_K"), "{e}");
        }
        let mut lying = info(12, vec![256, 2]);
        lying.bytes = 100;
        assert!(err(decode(&lying, &[0; 100])).contains("Q4_K"));
        let partial = info(12, vec![100]);
        assert!(err(decode(&partial, &[])).contains("block size 256"));
        // Streaming: a partial block, then ending early.
        let mut d = Decoder::new(&t).unwrap_or_else(|e| panic!("{e}"));
        assert!(d.push(&[0; 100]).is_err());
        assert!(d.push(&[0; 144]).is_ok());
        assert!(d.push(&[0; 288]).is_err());
        let e = d.finish().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("1 Q4_K blocks early"), "{e}");
    }

    #[test]
    fn q8_0_maps_exactly_and_overflow_goes_f32() {
        let mut block = vec![0u8; 34];
        let d = f16::from_f32(-0.5);
        block[..2].copy_from_slice(&d.to_bits().to_le_bytes());
        for (i, b) in block[2..].iter_mut().enumerate() {
            *b = (i as i16 * 7 - 100) as i8 as u8;
        }
        let t = info(8, vec![32]);
        let out = decode(&t, &block).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<f32> = (0..32)
            .map(|i| -0.5 * f32::from(i as i16 * 7 - 100))
            .collect();
        assert_eq!(to_f32(&out), want);
        assert!(matches!(
            out,
            Decoded::Affine {
                scales: Floats::F16(_),
                ..
            }
        ));
        // -128 * 1024 overflows float16: scales and biases go float32.
        block[..2].copy_from_slice(&f16::from_f32(1024.0).to_bits().to_le_bytes());
        let out = decode(&t, &block).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<f32> = (0..32)
            .map(|i| 1024.0 * f32::from(i as i16 * 7 - 100))
            .collect();
        assert_eq!(to_f32(&out), want);
        assert!(matches!(
            out,
            Decoded::Affine {
                biases: Floats::F32(_),
                ..
            }
        ));
    }

    #[test]
    fn five_bit_packing_is_a_little_endian_bit_stream() {
        let mut q = [0u8; PACK];
        for (i, x) in q.iter_mut().enumerate() {
            *x = (i * 7 % 32) as u8;
        }
        let mut words = Vec::new();
        pack(&q, 5, &mut words);
        assert_eq!(words.len(), 5);
        let bit = |k: usize| ((words[k / 32] >> (k % 32)) & 1) as u8;
        let back: Vec<u8> = (0..32)
            .map(|i| (0..5).map(|j| bit(5 * i + j) << j).sum())
            .collect();
        assert_eq!(back, q);
    }
}
