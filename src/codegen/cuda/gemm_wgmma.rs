//! The f16 prefill GEMM on Hopper's warpgroup MMA (`wgmma.mma_async`, sm_90a), as an option of
//! [`super::gemm_f16`]: a tuning record whose `rows_per_block` is [`WGMMA_STAGING`] asks for it
//! in a library built for sm_90 (other architectures keep the `mma.sync` kernel).
//!
//! Why: the `mma.sync` GEMM ran Llama-2-7B's prefill GEMMs at 157–190 TFLOP/s on an H200
//! (~19% of the f16 tensor-core peak), and PyTorch's cuBLAS kernels, which use `wgmma`, ran the
//! whole prefill 2.3× faster. On sm_90 `mma.sync` cannot reach the tensor cores' full rate, and
//! each warp must feed its own fragments from shared memory through `ldmatrix`; `wgmma` reads
//! both operands from shared memory itself, for a warpgroup (4 warps) at a time, and runs
//! asynchronously, so the next K step's operands are decoded and stored while it multiplies.
//!
//! How: the block is the same 128×128 tile, 256 threads, K in steps of 32, operands staged by
//! the same register path (global → registers → f16 in shared memory, two buffers), but two
//! steps ahead, in two sets of registers used in turn ([`k_loop`]); shapes whose operands
//! stage value by value (K not a multiple of 8) keep `mma.sync` (their second register set
//! would spill). Warpgroup `wg` (warps 4wg…4wg+3) computes rows `64·wg …` of the
//! tile × all 128 columns: per K step two `wgmma.m64n128k16`, whose accumulators are the
//! `mma.sync` C fragments of 16 tiles of 16×8 (warp `w % 4` of the group holds rows
//! `16·(w % 4) …`), so the epilogue is the `mma.sync` one with a 16×128 warp tile. Shared
//! memory holds the tiles in `wgmma`'s no-swizzle K-major layout: 8×8 "core matrices" of 128
//! contiguous bytes (8 rows of 16 bytes), core matrix (row / 8, k / 8) at
//! `((row / 8) · BK/8 + k / 8) · 128` bytes — the descriptor's leading byte offset (between core
//! matrices adjacent in K) 128, stride byte offset (adjacent in M or N) 512. A step: fence,
//! issue both products, commit; decode and store the next step into the other buffer (its
//! products finished at the previous step's wait), fetch the step after it; wait for this
//! step's products; `fence.proxy.async` (the stores become visible to `wgmma`'s reads, which
//! go through the async proxy); barrier.
//!
//! Not measured on a GPU yet (no Hopper machine was lent since it was written): the tests check
//! it in the emulator ([`crate::runtime::cuda`]'s, which reads the descriptors as the PTX ISA
//! describes them) bit for bit against the `mma.sync` kernel, and with ptxas that it assembles
//! for sm_90a without spills or serialized products (121–123 registers on Llama-2-7B's
//! shapes); the GPU check times it and compares its logits with the default build's.

/// The tuning's `rows_per_block` that selects this kernel (the f16 GEMM reads that knob as its
/// staging: 1 registers, 2 the `cp.async` ring, 4 this; records are powers of two).
pub const WGMMA_STAGING: u32 = 4;

/// The architecture a library is built for where the option applies, and what its PTX then
/// targets (`wgmma` is an sm_90a feature: such PTX loads on compute capability 9.0 only).
pub const WGMMA_ARCH: &str = "sm_90";
pub const WGMMA_PTX_ARCH: &str = "sm_90a";

/// Whether the f16 GEMM with tuning `rows_per_block`, in a library for `arch`, runs on `wgmma`.
pub fn applies(rows_per_block: u32, arch: &str) -> bool {
    rows_per_block == WGMMA_STAGING && arch == WGMMA_ARCH
}

/// Byte offsets of the descriptors (see the module doc): between core matrices adjacent in K,
/// and adjacent in rows, for tiles of `bk` K per step.
fn descriptor_offsets(bk: u32) -> (u32, u32) {
    (128, 128 * (bk / 8))
}

/// The index (in halves) of tile element (`r`, `k`) in the core-matrix layout, for `bk` K per
/// step: C expressions.
pub fn smem_index(r: &str, k: &str, bk: u32) -> String {
    format!(
        "((({r}) >> 3) * {cpr}u + (({k}) >> 3)) * 64u + (({r}) & 7u) * 8u + (({k}) & 7u)",
        cpr = bk / 8
    )
}

/// Device helpers: descriptors, the fences, and one `wgmma.m64n128k16` with f32 accumulators
/// (`d`: the warp's 16 mma tiles of 16×8, C layout) and both operands in shared memory. `a_tile`
/// and `b_tile` (the operands' shared arrays) are for the emulator, which cannot keep a
/// descriptor's 18-bit address apart from its own; the GPU ignores them.
pub fn helpers() -> String {
    let d: Vec<String> = (0..64).map(|i| format!("%{i}")).collect();
    let outs: Vec<String> = (0..64)
        .map(|i| format!("\"+f\"(d[{}][{}])", i / 4, i % 4))
        .collect();
    format!(
        r#"// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets (each >> 4, 14 bits), no swizzle, base offset 0. (The
// emulator reads the same bits.)
__device__ __forceinline__ u64 wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {{
    return (u64)((addr >> 4) & 0x3FFFu) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) | ((u64)((sbo >> 4) & 0x3FFFu) << 32);
}}
#ifndef MLCB_EMULATE
__device__ __forceinline__ void wg_fence() {{ asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }}
__device__ __forceinline__ void wg_commit() {{ asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }}
__device__ __forceinline__ void wg_wait_all() {{ asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }}
// This thread's generic-proxy shared-memory writes, visible to the async proxy (wgmma's reads).
__device__ __forceinline__ void async_proxy_fence() {{ asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }}
__device__ __forceinline__ void wgmma_n128(float (&d)[16][4], u64 da, u64 db, const void* a_tile, const void* b_tile) {{
    (void)a_tile; (void)b_tile;
    asm volatile("{{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {{{d}}}, %64, %65, p, 1, 1, 0, 0;\n}}\n"
        : {outs}
        : "l"(da), "l"(db), "r"(1));
}}
#endif
"#,
        d = d.join(", "),
        outs = outs.join(", "),
    )
}

/// `staging` (the register declarations `decls` and the `fetch`/`stash` lambdas of `gemm_f16`)
/// over a second set of registers, as `fetch_b`/`stash_b`: every array `decls` declares is
/// renamed with the suffix `_b`, wherever `staging` indexes it.
pub fn second_register_set(staging: &str, decls: &str) -> String {
    let mut s = staging
        .replace("auto fetch = ", "auto fetch_b = ")
        .replace("auto stash = ", "auto stash_b = ");
    for r in declared_arrays(decls) {
        s = rename_indexed(&s, r, &format!("{r}_b"));
    }
    s
}

/// The arrays C declarations declare (`uint4 wr_v[UPT]; float wr_s[UPT], wr_m[UPT];`).
fn declared_arrays(decls: &str) -> Vec<&str> {
    decls
        .split(';')
        .flat_map(|d| d.split(','))
        .filter_map(|d| d.split('[').next()?.split_whitespace().last())
        .filter(|name| !name.is_empty())
        .collect()
}

/// `text` with each indexing `name[` (not part of a longer identifier) as `to[`.
fn rename_indexed(text: &str, name: &str, to: &str) -> String {
    let pattern = format!("{name}[");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&pattern) {
        let whole = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        out.push_str(&rest[..at]);
        out.push_str(if whole { to } else { name });
        out.push('[');
        rest = &rest[at + pattern.len()..];
    }
    out.push_str(rest);
    out
}

/// The K loop (see the module doc), two steps per iteration: each step's products run while
/// the next step's operands, fetched a step earlier into one set of registers, are decoded
/// into the other buffer and the step after next is fetched into that set. A load thus has a
/// whole step to arrive (one step ahead, as the `mma.sync` kernel stages, the step after a
/// fetch waits for it). Expects `gemm_f16`'s `fetch`/`stash` and `fetch_b`/`stash_b` (the
/// prologue stashed step 0 from the first set and fetched step 1 into the second), the buffers
/// `xs[2][BM * BK]` and `ws[2][BN * BK]`, `acc[1][16][4]`, `warp` and `W_K`.
pub fn k_loop(bk: u32) -> String {
    let (lbo, sbo) = descriptor_offsets(bk);
    // A product's 16 K are two core matrices along K.
    let k16 = 2 * lbo;
    let step = |buf: u32, stash_next: &str, fetch_ahead: &str| {
        format!(
            "        {{
            wg_fence();
            #pragma unroll
            for (unsigned ks = 0; ks < BK / 16u; ++ks)
                wgmma_n128(acc[0],
                           wg_desc(xs_wg + {buf}u * (BM * BK * 2u) + ks * {k16}u, {lbo}u, {sbo}u),
                           wg_desc(ws_all + {buf}u * (BN * BK * 2u) + ks * {k16}u, {lbo}u, {sbo}u),
                           &xs[0][0], &ws[0][0]);
            wg_commit();
            // The other buffer's products finished at the previous step's wait.
            if (k + BK < W_K) {stash_next}({other}u, k + BK);
            if (k + 2u * BK < W_K) {fetch_ahead}(k + 2u * BK);
            wg_wait_all();
            async_proxy_fence();
            __syncthreads();
        }}",
            other = buf ^ 1,
        )
    };
    format!(
        "    // Warpgroup wg multiplies rows 64·wg … of the tile, every step, even where they are all
    // past the call's rows (zeros, in a short call's last tile): ptxas serializes wgmma issued
    // under a branch it cannot prove warpgroup-uniform (each product waited for at once).
    const unsigned wg = warp >> 2;
    const unsigned xs_wg = smem_u32(&xs[0][0]) + wg * (64u * BK * 2u), ws_all = smem_u32(&ws[0][0]);
    for (unsigned k0 = 0; k0 < W_K; k0 += 2u * BK) {{
        // Step k0 (buffer 0; the second set holds step k0 + BK), then step k0 + BK (buffer 1;
        // the first set holds the step after).
        unsigned k = k0;
{even}
        k = k0 + BK;
        if (k < W_K)
{odd}
    }}",
        even = step(0, "stash_b", "fetch"),
        odd = step(1, "stash", "fetch_b"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout the descriptors describe: core matrix (r / 8, k / 8) is 64 contiguous halves,
    /// its rows 8 halves apart; K-adjacent core matrices `lbo` bytes apart, row-adjacent `sbo`.
    #[test]
    fn the_smem_index_is_the_layout_the_descriptor_offsets_describe() {
        let bk = 32u32;
        let (lbo, sbo) = descriptor_offsets(bk);
        let index = |r: u32, k: u32| ((r >> 3) * (bk / 8) + (k >> 3)) * 64 + (r & 7) * 8 + (k & 7);
        let expr = smem_index("r", "k", bk);
        assert_eq!(
            expr,
            "(((r) >> 3) * 4u + ((k) >> 3)) * 64u + ((r) & 7u) * 8u + ((k) & 7u)"
        );
        let mut seen = std::collections::HashSet::new();
        for r in 0..128 {
            for k in 0..bk {
                let by_descriptor = (r / 8) * sbo + (k / 8) * lbo + (r % 8) * 16 + (k % 8) * 2;
                assert_eq!(index(r, k) * 2, by_descriptor, "({r}, {k})");
                assert!(seen.insert(index(r, k)), "({r}, {k}) overlaps");
            }
        }
        assert_eq!(seen.len(), 128 * bk as usize);
    }

    /// Its PTX targets sm_90a, which the runtime runs on compute capability 9.0 only.
    #[test]
    fn its_ptx_arch_is_specific_to_sm_90() {
        use crate::codegen::cuda::{arch_specific, ptx_arch_str};
        assert_eq!(ptx_arch_str(WGMMA_PTX_ARCH).unwrap(), "sm_90a");
        assert_eq!(arch_specific(WGMMA_PTX_ARCH), Some(90));
        assert_eq!(arch_specific(WGMMA_ARCH), None);
        assert_eq!(arch_specific("sm_80"), None);
        assert!(ptx_arch_str("sm_91a").is_err());
    }

    /// The second set renames exactly the declared arrays, wherever they are indexed, and no
    /// identifier that merely ends in one's name.
    #[test]
    fn the_second_register_set_renames_every_declared_array() {
        let decls = "uint4 xr[XPT];\n    unsigned wr_c[UPT][3]; float wr_s[UPT], wr_m[UPT];";
        assert_eq!(declared_arrays(decls), ["xr", "wr_c", "wr_s", "wr_m"]);
        let staging = format!(
            "{decls}\n auto fetch = [&](unsigned k0) {{ xr[j] = y; wr_c[j][i] = 1; wr_m[j] = f(wxr[0]); }};\n auto stash = [&](unsigned b) {{ g(xr[j], wr_s[j]); }};"
        );
        let b = second_register_set(&staging, decls);
        assert_eq!(
            b,
            "uint4 xr_b[XPT];\n    unsigned wr_c_b[UPT][3]; float wr_s_b[UPT], wr_m_b[UPT];\n auto fetch_b = [&](unsigned k0) { xr_b[j] = y; wr_c_b[j][i] = 1; wr_m_b[j] = f(wxr[0]); };\n auto stash_b = [&](unsigned b) { g(xr_b[j], wr_s_b[j]); };"
        );
    }

    #[test]
    fn only_sm_90_libraries_take_it() {
        assert!(applies(WGMMA_STAGING, "sm_90"));
        for arch in ["sm_80", "sm_86", "sm_89"] {
            assert!(!applies(WGMMA_STAGING, arch), "{arch}");
        }
        assert!(!applies(1, "sm_90") && !applies(2, "sm_90") && !applies(8, "sm_90"));
    }
}
