use super::*;
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::{
    BufferDecl, Op, WeightDecl, WeightStorage, PLAN_FORMAT_BASE,
};
use crate::model::testing::{build, open_weights, read_config, rel_err};
use crate::runtime::cpu::kernels::WeightView;
use crate::runtime::cpu::CpuModel;

fn cxx_or_skip(test: &str) -> bool {
    if have_cxx() {
        return true;
    }
    eprintln!("SKIP {test}: no g++ to compile the emulated CUDA kernels");
    false
}

/// CPU logits: one prefill with every position (the exact kernels).
fn cpu_logits(plan: &Plan, records: &[Vec<Vec<u8>>], ids: &[u32]) -> Vec<f32> {
    let recs: Vec<Vec<&[u8]>> = records
        .iter()
        .map(|w| w.iter().map(|r| r.as_slice()).collect())
        .collect();
    let views = WeightView::for_plan(plan, &recs);
    let model = CpuModel::new(plan, views).unwrap();
    let mut s = model.session();
    s.forward(ids, true).unwrap()
}

/// The bound on logits (relative to the CPU's) of kernels that multiply on f16 tensor cores:
/// prefill of f16 schemes, and their decode over q4 and row-major q8 weights (`f16_decode`); other
/// decode steps are f32 and keep the caller's bound.
const F16_TOL: f64 = 5e-3;

/// Emulated GPU: one prefill with every logit, then the first `n_decode` ids one per call
/// (decode), each against the CPU's prefill logits. Prefill of f16 plans, and decode where
/// it runs on tensor cores, are held to [`F16_TOL`] and must show f16 rounding (above 1e-5:
/// else the f16 kernels silently stopped being used); the rest to `tol`.
fn check_plan(
    plan: &Plan,
    records: &[Vec<Vec<u8>>],
    ids: &[u32],
    n_decode: usize,
    tunings: &[CudaTuning],
    tol: f64,
    what: &str,
) {
    let want = cpu_logits(plan, records, ids);
    let v = plan.vocab_size;
    let f16_decode = crate::codegen::cuda::f16_decode(plan).unwrap();
    let tol_prefill = if crate::codegen::cuda::f16_prefill(plan) {
        F16_TOL
    } else {
        tol
    };
    let tol_decode = if f16_decode { F16_TOL } else { tol };
    for &tuning in tunings {
        let (tpb, rpb, splits, ring) = (
            tuning.threads_per_block,
            tuning.rows_per_block,
            tuning.kv_splits,
            tuning.weight_ring,
        );
        let k = EmuKernels::compile(
            generate_plan(plan, &tuning_records(plan, tuning), "sm_80").unwrap(),
        );
        let mut s = EmuSession::new(plan, &k, records);
        let pre = s.forward(ids, true);
        let e = rel_err(&pre, &want);
        assert!(
            e < tol_prefill,
            "{what} ({tpb}/{rpb}/{splits}/{ring}) prefill: rel err {e:e}"
        );
        let mut s = EmuSession::new(plan, &k, records);
        let mut dec = Vec::new();
        for id in &ids[..n_decode] {
            dec.extend(s.forward(&[*id], false));
        }
        let e2 = rel_err(&dec, &want[..n_decode * v]);
        assert!(
            e2 < tol_decode && (!f16_decode || e2 > 1e-5),
            "{what} ({tpb}/{rpb}/{splits}/{ring}) decode: rel err {e2:e}"
        );
        // A prefill continuing a session, last position only.
        let last = s.forward(&ids[n_decode..], false);
        let e3 = rel_err(&last, &want[(ids.len() - 1) * v..]);
        assert!(
            e3 < tol_prefill,
            "{what} ({tpb}/{rpb}/{splits}/{ring}) prefill after decode: rel err {e3:e}"
        );
        eprintln!("{what} ({tpb}/{rpb}/{splits}/{ring}): rel err prefill {e:.2e}, decode {e2:.2e}, continued prefill {e3:.2e}");
    }
}

#[test]
fn fixture_plans_match_the_cpu() {
    if !cxx_or_skip("fixture_plans_match_the_cpu") {
        return;
    }
    // The preset default (128 threads, 4 rows, decode attention over 8 blocks per head) on
    // Llama; the others with 64 threads and 16 rows, which emulate faster (fewer threads
    // switching at each barrier for the same work) and are as valid a tuning (the matrices
    // test covers every scheme with the default); NeoX's decode attention in one block per
    // head. The decode steps see 1–4 keys: most of Llama's 8 key splits are empty.
    for (fx, arch, tuning) in [
        ("tiny-llama", "llama", tuned(128, 4, 8)),
        ("tiny-neox", "gpt_neox", tuned(64, 16, 1)),
        ("tiny-rwkv", "rwkv", tuned(64, 16, 1)),
    ] {
        let (plan, records, ids) = fixture_plan(fx, arch, "q0f32");
        check_plan(&plan, &records, &ids, 4, &[tuning], 1e-4, fx);
    }
}

fn fixture_plan(fx: &str, arch: &str, scheme: &str) -> (Plan, Vec<Vec<Vec<u8>>>, Vec<u32>) {
    let a = crate::model::by_name(arch).unwrap_or_else(|| panic!("architecture {arch}"));
    let config = a.parse_config(&read_config(fx)).unwrap();
    let w = open_weights(fx);
    let built = build(a, &config, &[w.as_ref()], scheme, 80);
    // Decode steps fused as the cuda target fuses them.
    let plan = crate::codegen::fuse::fuse_for_cuda(built.plan);
    let ids: Vec<u32> = (0..20u32)
        .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
        .collect();
    (plan, built.records, ids)
}

/// Prefill of whole fixture models in two calls (30 rows, then 15 more at position 30), then
/// 4 decode steps (46–49 keys in the decode attention's cache, split over 8 blocks per
/// head): the query-tiled attention over several query and key tiles, reading the KV cache
/// the first call wrote (head_dim 64 and 80; f16 for the f16 schemes); and the f16
/// tensor-core GEMM staging 16-byte chunks of quantized NK rows (q4f16_1), raw f16 rows with
/// biases (q0f16) and words of KN matrices (q4f16_0);
/// `quantized_matrices_of_every_scheme_match_the_cpu` covers decoded elements (q3, or
/// K = 70). f16 errors must stay inside the f16 bound and above f32 accuracy (so the test
/// fails if the f16 kernel silently stops being used).
#[test]
fn prefill_of_fixture_plans_matches_the_cpu() {
    if !cxx_or_skip("prefill_of_fixture_plans_matches_the_cpu") {
        return;
    }
    for (fx, arch, scheme) in [
        ("tiny-llama", "llama", "q0f32"),
        ("tiny-llama", "llama", "q4f16_1"),
        ("tiny-neox", "gpt_neox", "q0f16"),
        ("tiny-rwkv", "rwkv", "q4f16_0"),
    ] {
        let (plan, records, _) = fixture_plan(fx, arch, scheme);
        let ids: Vec<u32> = (0..49u32)
            .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
            .collect();
        let want = cpu_logits(&plan, &records, &ids);
        // 64 threads and 16 rows per block: the prefill kernels have fixed blocks, and the
        // decode steps emulate faster than with the default (see above). Decode
        // attention over 8 blocks per head: 6–7 keys each. For sm_90: the decode kernels
        // carry the programmatic-dependent-launch preamble (compiled out here).
        let k = EmuKernels::compile(
            generate_plan(&plan, &tuning_records(&plan, tuned(64, 16, 8)), "sm_90").unwrap(),
        );
        let f16 = crate::codegen::cuda::f16_prefill(&plan);
        // f16 schemes keep an f16 KV cache (RWKV has none).
        let kv_elem = super::super::bind::kv_elem_bytes(k.kernels.iter().map(|k| &k.launch));
        let f16_kv = f16 && arch != "rwkv";
        assert_eq!(
            kv_elem.unwrap(),
            if f16_kv { 2 } else { 4 },
            "{fx} {scheme}"
        );
        let mut s = EmuSession::new(&plan, &k, &records);
        let mut got = s.forward(&ids[..30], true);
        got.extend(s.forward(&ids[30..45], true));
        let v = plan.vocab_size;
        let e = rel_err(&got, &want[..45 * v]);
        if f16_kv && arch == "llama" {
            // This call's keys count as the cache keeps them (rounded to f16), so the split
            // into calls changes nothing: one 45-row prefill gives the same bits (Llama
            // only: each emulated prefill costs seconds).
            let one = EmuSession::new(&plan, &k, &records).forward(&ids[..45], true);
            assert!(
                one.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{fx} {scheme}: prefill in one call and in two differ"
            );
        }
        // Then 4 decode steps over the cache the prefills wrote: 46..49 keys, so every warp
        // of the decode attention has keys, over several steps with a ragged last one.
        let mut dec = Vec::new();
        for id in &ids[45..] {
            dec.extend(s.forward(&[*id], false));
        }
        let e_dec = rel_err(&dec, &want[45 * v..]);
        eprintln!("{fx} {scheme}: prefill in two calls, rel err {e:.2e}; then decode {e_dec:.2e}");
        if f16 {
            assert!(e < F16_TOL && e > 1e-5, "{fx} {scheme}: rel err {e:e}");
            // The cache holds f16 keys and values the f16 prefill computed.
            assert!(e_dec < F16_TOL, "{fx} {scheme}: decode rel err {e_dec:e}");
        } else {
            assert!(e < 1e-4, "{fx} {scheme}: rel err {e:e}");
            assert!(e_dec < 1e-4, "{fx} {scheme}: decode rel err {e_dec:e}");
        }
    }
}

/// f16 activations between prefill kernels (`codegen::cuda::half_activations`) are rounded
/// exactly where the f16 GEMM used to round its f32 activations, so they change no bit of
/// any logit: Llama q4f16_1 (its normed, attention and silu·mul outputs), GPT-NeoX q0f16
/// (its two norms', its attention's, and its up projection's with the GELU in the GEMM's
/// epilogue) and the matrix plan (K = 70 and 19: rows that are not 16-byte aligned, read
/// half by half; GELU with a bias), each with and without them, in one 45-row prefill; and
/// the last row's logits alone, as a generating call asks for them. (RWKV's relu² key takes
/// the same epilogue path: `prefill_of_fixture_plans_matches_the_cpu` runs it, q4f16_0.)
#[test]
fn f16_activations_change_no_bit_of_the_logits() {
    if !cxx_or_skip("f16_activations_change_no_bit_of_the_logits") {
        return;
    }
    let fixture = |fx, arch, scheme| {
        let (plan, records, _) = fixture_plan(fx, arch, scheme);
        (format!("{fx} {scheme}"), plan, records)
    };
    let (plan, records) = quant_plan("q4f16_1", (40, 70, 19));
    for (name, plan, records) in [
        fixture("tiny-llama", "llama", "q4f16_1"),
        fixture("tiny-neox", "gpt_neox", "q0f16"),
        ("matrices q4f16_1".to_string(), plan, records),
    ] {
        let ids: Vec<u32> = (0..45u32)
            .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
            .collect();
        let recs = tuning_records(&plan, tuned(64, 16, 8));
        let with = EmuKernels::compile(generate_plan(&plan, &recs, "sm_90").unwrap());
        let f16_args = |k: &EmuKernels| {
            k.kernels
                .iter()
                .flat_map(|k| &k.launch.args)
                .filter(|a| a.role == "activation" && a.elem == "f16")
                .count()
        };
        // A writer and a reader of an f16 buffer at least.
        assert!(f16_args(&with) >= 2, "{name}: {}", f16_args(&with));
        let without = EmuKernels::compile(
            crate::codegen::cuda::generate_plan_with(&plan, &recs, "sm_90", &Default::default())
                .unwrap(),
        );
        assert_eq!(f16_args(&without), 0);
        let a = EmuSession::new(&plan, &with, &records).forward(&ids, true);
        let b = EmuSession::new(&plan, &without, &records).forward(&ids, true);
        assert_eq!(a.len(), b.len());
        if let Some(i) = first_differing_bits(&a, &b) {
            panic!(
                "{name}: logit {i} is {} with f16 activations, {} without",
                a[i], b[i]
            );
        }
        // A generating call's prefill computes the last row's logits alone (the GEMM reads
        // that one row of the f16 buffer).
        let last = EmuSession::new(&plan, &with, &records).forward(&ids, false);
        let v = plan.vocab_size;
        assert_eq!(
            first_differing_bits(&last, &a[a.len() - v..]),
            None,
            "{name}: the last row's logits alone differ"
        );
    }
}

/// The prefill GEMM's activation ring (`gemm_f16::x_ring`: the f16 activation tile copied
/// by cp.async two K steps ahead into swizzled buffers) stages the same values as the
/// register path, so every logit keeps its bits, with both warp tilings: the matrix plan
/// (norm → SiLU-gated gate/up GEMM → down GEMM, both reading f16 activations) with q4 codes
/// at K = 72 and 40 (16-byte chunks past K zero-filled) and raw f16 weights, which take a
/// ring of their own, at K = 64 and 96 (whole steps, 2 and 3 of them). 150 rows: a full row
/// tile and a short one (the copy of the loop for short tiles; rows past the call
/// zero-filled). The ring runs twice: with the emulated copies landing at their wait (a read
/// before it, or before the barrier after another thread's, sees stale bytes) and at their
/// issue (a buffer refilled while a warp still reads it changes what that warp reads).
#[test]
fn the_activation_ring_changes_no_bit_of_the_logits() {
    if !cxx_or_skip("the_activation_ring_changes_no_bit_of_the_logits") {
        return;
    }
    use crate::codegen::cuda::gemm_f16::X_RING_AHEAD;
    for (scheme, shape) in [("q4f16_1", (40, 72, 40)), ("q0f16", (40, 64, 96))] {
        let (plan, records) = quant_plan_of(scheme, shape, 160);
        let name = format!("{scheme} {shape:?}");
        let ids: Vec<u32> = (0..150u32)
            .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
            .collect();
        for threads in [256, 128] {
            let compile = |rows| {
                let recs = tuning_records_where(
                    &plan,
                    tuned(64, 16, 8),
                    prefill_gemm,
                    tuned(threads, rows, 1),
                );
                EmuKernels::compile(generate_plan(&plan, &recs, "sm_80").unwrap())
            };
            let (regs, ring) = (compile(1), compile(X_RING_AHEAD));
            // And with every copy landing at its issue: no buffer is refilled while a warp
            // still reads it.
            let early = EmuKernels::compile_with(ring.kernels.clone(), CopyLanding::AtIssue);
            let ringed = |k: &EmuKernels, what: &str| {
                k.kernels
                    .iter()
                    .filter(|k| k.source.contains(&format!("cp_async16({what}")))
                    .count()
            };
            assert_eq!(ringed(&regs, "xs_dst"), 0, "{name}");
            assert!(ringed(&ring, "xs_dst") >= 2, "{name}");
            // Raw f16 weights ring too.
            let w = ringed(&ring, "ws_dst");
            assert_eq!(w >= 2, scheme == "q0f16", "{name}: {w} weight rings");
            let a = EmuSession::new(&plan, &regs, &records).forward(&ids, true);
            for (k, landing) in [(&ring, "at the wait"), (&early, "at the issue")] {
                let b = EmuSession::new(&plan, k, &records).forward(&ids, true);
                assert_eq!(a.len(), b.len());
                if let Some(i) = first_differing_bits(&a, &b) {
                    panic!(
                        "{name} ({threads} threads, copies landing {landing}): logit {i} is {} with the ring, {} without",
                        b[i], a[i]
                    );
                }
            }
        }
    }
}

/// The f16 GEMM on warpgroup MMA (`gemm_wgmma`, sm_90 libraries) stages the same f16 operands
/// and sums the same products in the same K order as the `mma.sync` kernel, so every prefill
/// logit keeps its bits: the matrix plan with row-major q4 codes (K = 72: a short last K step),
/// K-major q4 codes (q4f16_0), raw f16 weights, 8-bit codes and 3-bit ones in units of the
/// words they span (row-major and K-major), its GEMMs reading f32 (the head, over the
/// residual stream) and f16 activations, a SiLU-gated and an activation epilogue. 150 rows: a
/// full row tile, then one whose second warpgroup holds no row of the call (it multiplies the
/// zeros staged past the call's rows). The emulator reads the operands at the wait, so a store into a buffer the
/// products still read shows as changed logits.
#[test]
fn the_wgmma_gemm_changes_no_bit_of_the_logits() {
    if !cxx_or_skip("the_wgmma_gemm_changes_no_bit_of_the_logits") {
        return;
    }
    use crate::codegen::cuda::gemm_wgmma::{WGMMA_PTX_ARCH, WGMMA_STAGING};
    for (scheme, shape) in [
        ("q4f16_1", (40, 72, 40)),
        ("q4f16_0", (40, 64, 48)),
        ("q0f16", (40, 64, 96)),
        ("q8f16_1", (40, 64, 32)),
        ("q3f16_1", (40, 80, 40)),
        ("q3f16_0", (40, 80, 40)),
    ] {
        let (plan, records) = quant_plan_of(scheme, shape, 160);
        let name = format!("{scheme} {shape:?}");
        let ids: Vec<u32> = (0..150u32)
            .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
            .collect();
        let compile = |rows| {
            let recs =
                tuning_records_where(&plan, tuned(64, 16, 8), prefill_gemm, tuned(256, rows, 1));
            EmuKernels::compile(generate_plan(&plan, &recs, "sm_90").unwrap())
        };
        let (mma, wgmma) = (compile(1), compile(WGMMA_STAGING));
        let on_wgmma = |k: &EmuKernels| {
            k.kernels
                .iter()
                .filter(|k| k.source.contains("wgmma_n128(acc[0]"))
                .inspect(|k| assert_eq!(k.launch.arch, WGMMA_PTX_ARCH, "{}", k.signature))
                .count()
        };
        assert_eq!(on_wgmma(&mma), 0, "{name}");
        assert_eq!(on_wgmma(&wgmma), 3, "{name}: the prefill GEMMs");
        let a = EmuSession::new(&plan, &mma, &records).forward(&ids, true);
        let b = EmuSession::new(&plan, &wgmma, &records).forward(&ids, true);
        assert_eq!(a.len(), b.len());
        if let Some(i) = first_differing_bits(&a, &b) {
            panic!(
                "{name}: logit {i} is {} with wgmma, {} with mma.sync",
                b[i], a[i]
            );
        }
    }
}

/// Whether a kernel signature is a prefill GEMM's (a matmul's or the head's).
fn prefill_gemm(sig: &str) -> bool {
    sig.starts_with("prefill:matmul") || sig.starts_with("prefill:logits")
}

/// The first index (of the shorter's) where `a` and `b` differ in any bit, or `None`.
fn first_differing_bits(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
}

/// `len` values in [-1, 1) from an xorshift seeded by `seed`.
fn random_values(len: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Weight `name` of `shape` quantized by `scheme` for `role`: its declaration and records.
fn quantized_weight(
    scheme: &str,
    role: crate::quant::scheme::TensorRole,
    name: &str,
    shape: Vec<usize>,
    values: &[f32],
) -> (WeightDecl, Vec<Vec<u8>>) {
    let s = crate::quant::scheme::scheme(scheme).unwrap();
    let enc = crate::quant::quantize_param(s, role, name, &shape, values).unwrap();
    let storage = match s.layout_for(role) {
        Some(layout) => WeightStorage::Quantized {
            scheme: scheme.into(),
            layout,
        },
        None => WeightStorage::Raw {
            dtype: enc[0].dtype,
        },
    };
    let decl = WeightDecl {
        name: name.into(),
        shape,
        storage,
        records: enc.iter().map(|r| r.name.clone()).collect(),
    };
    (decl, enc.into_iter().map(|r| r.bytes).collect())
}

/// [`quantized_weight`] of each `(name, role, shape, values)`: declarations and records.
fn quantized_weights(
    scheme: &str,
    weights: Vec<(&str, crate::quant::scheme::TensorRole, Vec<usize>, Vec<f32>)>,
) -> (Vec<WeightDecl>, Vec<Vec<Vec<u8>>>) {
    weights
        .into_iter()
        .map(|(name, role, shape, values)| quantized_weight(scheme, role, name, shape, &values))
        .unzip()
}

/// A plan of `scheme` running `ops` in prefill and decode over `buffers` (name, columns;
/// the first is the hidden state, `logits` the logits, whose columns are the vocabulary).
fn test_plan(
    scheme: &str,
    weights: Vec<WeightDecl>,
    buffers: &[(&str, usize)],
    states: Vec<StateDecl>,
    ops: Vec<Op>,
    logits: usize,
    max_seq_len: usize,
) -> Plan {
    Plan {
        format_version: PLAN_FORMAT_BASE,
        arch: "test".into(),
        quantization: scheme.into(),
        model_dtype: crate::quant::scheme::scheme(scheme).unwrap().model_dtype,
        vocab_size: buffers[logits].1,
        hidden_size: buffers[0].1,
        max_seq_len,
        stop_tokens: vec![0],
        weights,
        buffers: buffers
            .iter()
            .map(|(name, cols)| BufferDecl {
                name: (*name).into(),
                cols: *cols,
            })
            .collect(),
        states,
        prefill: ops.clone(),
        decode: ops,
        logits,
    }
}

/// embedding → a gated MLP with a residual (rms_norm, gate/up matmul with bias, silu_mul, down
/// matmul, gelu, add) → logits, every matrix quantized with `scheme`; decode fused as the cuda
/// target fuses it (gate/up with the norm and the silu gate, down with the gelu and the
/// residual), prefill not.
fn quant_plan(scheme: &str, shape: (usize, usize, usize)) -> (Plan, Vec<Vec<Vec<u8>>>) {
    quant_plan_of(scheme, shape, 80)
}

/// [`quant_plan`] for prompts of up to `max_seq_len` tokens.
fn quant_plan_of(
    scheme: &str,
    (v, h, f): (usize, usize, usize),
    max_seq_len: usize,
) -> (Plan, Vec<Vec<Vec<u8>>>) {
    use crate::quant::scheme::TensorRole;
    let (weights, records) = quantized_weights(
        scheme,
        [
            ("embed.weight", vec![v, h], TensorRole::Embedding, 1),
            ("gate_up.weight", vec![2 * f, h], TensorRole::Linear, 2),
            ("gate_up.bias", vec![2 * f], TensorRole::Raw, 3),
            ("down.weight", vec![h, f], TensorRole::Linear, 5),
            ("head.weight", vec![v, h], TensorRole::LmHead, 4),
            ("norm.weight", vec![h], TensorRole::Raw, 6),
        ]
        .into_iter()
        .map(|(name, shape, role, seed)| {
            let values = random_values(shape.iter().product(), seed);
            (name, role, shape, values)
        })
        .collect(),
    );
    let ops = vec![
        Op::Embedding { weight: 0, out: 0 },
        Op::RmsNorm {
            input: 0,
            weight: 5,
            eps: 1e-5,
            out: 5,
        },
        Op::matmul(5, 1, Some(2), 1),
        Op::SiluMul { input: 1, out: 2 },
        Op::matmul(2, 3, None, 3),
        Op::Gelu { buf: 3 },
        Op::Add { a: 0, b: 3, out: 0 },
        Op::Logits {
            input: 0,
            weight: 4,
        },
    ];
    let buffers = [
        ("h", h),
        ("gate_up", 2 * f),
        ("act", f),
        ("proj", h),
        ("logits", v),
        ("normed", h),
    ];
    let plan = test_plan(scheme, weights, &buffers, vec![], ops, 4, max_seq_len);
    let plan = crate::codegen::fuse::fuse_for_cuda(plan);
    assert_eq!(
        plan.decode.len(),
        4,
        "norm and silu gate, gelu and residual fused"
    );
    (plan, records)
}

/// embedding (`[n, k]`: row t is `e_t`, the identity's row t quantized, for t < k) → logits
/// (`[n, k]` random, `scheme`'s lm_head storage). In the prefill of tokens 0..k, logit
/// `[t, c]` is one product, `x[t]·W[c, t]`, with `x[t]` the gathered (f16) embedding value.
fn one_hot_plan(scheme: &str, n: usize, k: usize) -> (Plan, Vec<Vec<Vec<u8>>>) {
    use crate::quant::scheme::TensorRole;
    let embed: Vec<f32> = (0..n * k)
        .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
        .collect();
    let (weights, records) = quantized_weights(
        scheme,
        vec![
            ("embed.weight", TensorRole::Embedding, vec![n, k], embed),
            (
                "head.weight",
                TensorRole::LmHead,
                vec![n, k],
                random_values(n * k, 7),
            ),
        ],
    );
    let ops = vec![
        Op::Embedding { weight: 0, out: 0 },
        Op::Logits {
            input: 0,
            weight: 1,
        },
    ];
    let plan = test_plan(
        scheme,
        weights,
        &[("h", k), ("logits", n)],
        vec![],
        ops,
        1,
        k,
    );
    (plan, records)
}

/// The artifact's values (f16-rounded decodes) of [`one_hot_plan`]'s embedding and head.
fn one_hot_values(
    scheme: &str,
    records: &[Vec<Vec<u8>>],
    n: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>) {
    use crate::quant::scheme::TensorRole;
    let s = crate::quant::scheme::scheme(scheme).unwrap();
    let values = |i: usize, role| {
        let recs: Vec<&[u8]> = records[i].iter().map(|r| r.as_slice()).collect();
        crate::quant::dequantize_param(s, role, &[n, k], &recs).unwrap()
    };
    (
        values(0, TensorRole::Embedding),
        values(1, TensorRole::LmHead),
    )
}

/// The f16 tensor-core GEMM, exactly (see [`one_hot_plan`]): its operands are f16, so logit
/// `[t, c]` must be `x[t] · W[c, t]` with the artifact's f16 values of both (the CPU's
/// `dequantize_param`), a product exact in f32. Covers both warp tilings and wgmma, every weight
/// staging path (sym 4/8-bit codes decoded in f16 pairs,
/// NK and KN; raw f16 stored as is; 3-bit codes in units of the words they span, K past a
/// unit too), the ldmatrix fragments and
/// 128-row tiles (tokens 0..k span two; where k is not a multiple of 128 the second is
/// partial, and its warps multiply only their mma tiles that hold tokens), with tile-multiple
/// shapes (no bounds checks
/// generated) and ragged ones (N and K past a tile; K not a multiple of 16 for the
/// value-by-value paths).
#[test]
fn f16_gemm_of_one_hot_rows_is_exact() {
    if !cxx_or_skip("f16_gemm_of_one_hot_rows_is_exact") {
        return;
    }
    for (scheme, n, k) in [
        ("q4f16_1", 256, 256),
        ("q4f16_1", 264, 208),
        ("q4f16_1", 272, 224),
        ("q4f16_0", 256, 256),
        ("q4f16_0", 264, 200),
        ("q8f16_1", 256, 256),
        ("q8f16_1", 272, 224),
        ("q8f16_0", 264, 200),
        ("q0f16", 256, 256),
        ("q0f16", 264, 204),
        ("q3f16_1", 264, 200),
        ("q3f16_0", 264, 200),
        // K past a unit of 8 (the group's padding codes there meet the zeros staged past K).
        ("q3f16_1", 264, 204),
        // 9 row tiles: a whole group of 8 in the grouped block order, then a group of one.
        ("q4f16_1", 1048, 1040),
    ] {
        let (plan, records) = one_hot_plan(scheme, n, k);
        assert!(crate::codegen::cuda::f16_prefill(&plan), "{scheme}");
        let (e, w) = one_hot_values(scheme, &records, n, k);
        let mut want = Vec::with_capacity(n * k);
        for t in 0..k {
            let x = &e[t * k..(t + 1) * k];
            assert!(x.iter().enumerate().all(|(i, v)| (i == t) == (*v != 0.0)));
            want.extend((0..n).map(|c| x[t] * w[c * k + t]));
        }
        // Both warp tilings (`gemm_f16::WarpTiles`): 256 threads (64×32 warp tiles), 128
        // (64×64); their weight staging differs too (units of 8 or 4 words per thread). And
        // wgmma (a record of rows 4 in an sm_90 library, 256 threads).
        // (The 9-row-tile case checks the block order, which every tiling shares: once.)
        let tilings: &[(u32, &str)] = if k > 1024 {
            &[(256, "sm_80")]
        } else {
            &[(256, "sm_80"), (128, "sm_80"), (256, "sm_90")]
        };
        for &(threads, arch) in tilings {
            let kernels = EmuKernels::compile(
                generate_plan(&plan, &tuning_records(&plan, tuned(threads, 4, 1)), arch).unwrap(),
            );
            let gemm = kernels
                .kernels
                .iter()
                .find(|k| k.signature.starts_with("prefill:logits"))
                .expect("a prefill GEMM");
            assert_eq!(gemm.launch.block[0], threads, "{scheme}");
            let ids: Vec<u32> = (0..k as u32).collect();
            let got = EmuSession::new(&plan, &kernels, &records).forward(&ids, true);
            assert_eq!(got.len(), want.len());
            let bad = got.iter().zip(&want).position(|(a, b)| a != b);
            if let Some(i) = bad {
                panic!(
                    "{scheme} [{n}, {k}] ({threads} threads, {arch}): row {}, column {}: {} on the GPU, {} expected",
                    i / n,
                    i % n,
                    got[i],
                    want[i]
                );
            }
        }
        assert!(want.iter().filter(|v| **v != 0.0).count() > n * k / 2);
    }
}

/// The tensor-core decode GEMV (q4 weights of f16 schemes, row-major and K-major; q8
/// row-major), exactly, as
/// [`f16_gemm_of_one_hot_rows_is_exact`] checks prefill: decoding token t gives logit
/// `[c] = x[t] · W[c, t]`. Shapes: several batches of load steps that divide K exactly
/// (2048: 64 chunks, 2 warps), K past the last step (200 at 128 threads: 7 chunks for 16
/// lanes per step), N past the last block (2064 at 4 tiles a block, 264); row-major
/// matrices whose rows fill 16-row tiles (2064, 272) in row blocks
/// (`codegen::cuda::row_blocks`), 272 × 200 with a ragged last run of groups; the logits
/// GEMV only (fusions share the f32 GEMV's epilogue, covered by the fixture and matrix
/// tests).
#[test]
fn f16_gemv_of_one_hot_rows_is_exact() {
    if !cxx_or_skip("f16_gemv_of_one_hot_rows_is_exact") {
        return;
    }
    // The weight ring (depth, 0: registers) where rows are whole runs of 4 groups, on sm_90
    // too, whose kernels issue the ring's first steps before their programmatic-launch wait.
    for (scheme, n, k, threads, ring, arch) in [
        ("q4f16_1", 2064, 2048, 64, 0, "sm_80"),
        ("q4f16_1", 2064, 2048, 128, 8, "sm_90"),
        ("q4f16_1", 264, 200, 128, 0, "sm_80"),
        ("q4f16_1", 272, 200, 128, 0, "sm_80"),
        ("q4f16_0", 2056, 2048, 64, 0, "sm_80"),
        ("q4f16_0", 264, 200, 128, 0, "sm_80"),
        ("q8f16_1", 2064, 2048, 64, 0, "sm_80"),
        ("q8f16_1", 2064, 2048, 64, 5, "sm_80"),
        ("q8f16_1", 264, 200, 128, 0, "sm_80"),
        ("q8f16_1", 272, 200, 128, 0, "sm_80"),
    ] {
        // The first and last tokens, and some between.
        let tokens: &[u32] = if k == 2048 {
            &[0, 37, 1000, 2047]
        } else {
            &[0, 5, 199]
        };
        let (plan, records) = one_hot_plan(scheme, n, k);
        assert!(crate::codegen::cuda::f16_decode(&plan).unwrap());
        let (e, mut w) = one_hot_values(scheme, &records, n, k);
        // 4-bit codes: the GEMV scales each group's sum in f32, so a weight counts as
        // `(q − maxq)·s` exactly (not rounded to f16), and the one product with the token's
        // activation is rounded once.
        if scheme.starts_with("q4") {
            let s = crate::quant::scheme::scheme(scheme).unwrap();
            let recs: Vec<&[u8]> = records[1].iter().map(|r| r.as_slice()).collect();
            w = crate::quant::sym_values_unrounded(
                s,
                crate::quant::scheme::TensorRole::LmHead,
                &[n, k],
                &recs,
            )
            .unwrap();
        }
        let tuning = CudaTuning {
            weight_ring: ring,
            ..tuned(threads, 4, 1)
        };
        let kernels = generate_plan(&plan, &tuning_records(&plan, tuning), arch).unwrap();
        let gemv = kernels
            .iter()
            .find(|k| k.signature.starts_with("decode:logits"))
            .unwrap();
        assert_eq!(
            gemv.source.contains("__shared__ uint4 wring"),
            ring > 0,
            "{scheme} {arch} ring {ring}"
        );
        // A ring's copies land at their wait, and (a refill overwriting a slot some lane
        // still reads) at their issue.
        let landings = if ring > 0 {
            &[CopyLanding::AtWait, CopyLanding::AtIssue][..]
        } else {
            &[CopyLanding::AtWait][..]
        };
        for &landing in landings {
            let kernels = EmuKernels::compile_with(kernels.clone(), landing);
            let mut session = EmuSession::new(&plan, &kernels, &records);
            for &t in tokens {
                let t = t as usize;
                let got = session.forward(&[t as u32], false);
                let want: Vec<f32> = (0..n).map(|c| e[t * k + t] * w[c * k + t]).collect();
                if let Some(c) = got.iter().zip(&want).position(|(a, b)| a != b) {
                    panic!(
                    "{scheme} [{n}, {k}] ring {ring} {arch} {landing:?} token {t}: column {c}: {} on the GPU, {} expected",
                    got[c], want[c]
                );
                }
                assert!(want.iter().filter(|v| **v != 0.0).count() > n / 2);
            }
        }
    }
}

/// embedding (`[256, cols]`: a token's row is its q, k and v, random in ±3 so the softmax is
/// far from uniform) → attention (`n_q` heads over `n_kv` key/value heads of `head_dim`,
/// no rotary) → logits (`[v, n_q·head_dim]` random), `scheme`'s storage.
/// embedding (a token's row is its qkv) → (rotary over `rotary_dim`) → attention → logits,
/// every weight `scheme`'s; with rotary, decode fused as the cuda target fuses it (the
/// attention rotates q and the new key itself).
fn attention_plan(
    scheme: &str,
    n_q: usize,
    n_kv: usize,
    head_dim: usize,
    rotary_dim: Option<usize>,
) -> (Plan, Vec<Vec<Vec<u8>>>) {
    use crate::quant::scheme::TensorRole;
    let (v, qc) = (256usize, n_q * head_dim);
    let cols = qc + 2 * n_kv * head_dim;
    let embed: Vec<f32> = random_values(v * cols, 11)
        .iter()
        .map(|x| 3.0 * x)
        .collect();
    let (weights, records) = quantized_weights(
        scheme,
        vec![
            ("embed.weight", TensorRole::Embedding, vec![v, cols], embed),
            (
                "head.weight",
                TensorRole::LmHead,
                vec![v, qc],
                random_values(v * qc, 12),
            ),
        ],
    );
    let mut ops = vec![Op::Embedding { weight: 0, out: 0 }];
    if let Some(rotary_dim) = rotary_dim {
        ops.push(Op::Rotary {
            qkv: 0,
            n_q_heads: n_q,
            n_kv_heads: n_kv,
            head_dim,
            rotary_dim,
            theta: 10000.0,
        });
    }
    ops.extend([
        Op::Attention {
            qkv: 0,
            state: 0,
            n_q_heads: n_q,
            n_kv_heads: n_kv,
            head_dim,
            out: 1,
            rotary: None,
        },
        Op::Logits {
            input: 1,
            weight: 1,
        },
    ]);
    let kv_cache = StateDecl::KvCache {
        layer: 0,
        n_kv_heads: n_kv,
        head_dim,
    };
    let buffers = [("qkv", cols), ("y", qc), ("logits", v)];
    let plan = test_plan(scheme, weights, &buffers, vec![kv_cache], ops, 2, 256);
    (crate::codegen::fuse::fuse_for_cuda(plan), records)
}

/// Prefill attention of f16 schemes on tensor cores (`codegen::cuda::attention_mma`) against
/// the CPU: 150 rows (three 64-query tiles, the last ragged; keys over three 64-key tiles),
/// then 70 more at position 150 (earlier keys from the f16 cache the first call wrote), then
/// two decode steps over that cache; grouped (4 query heads over 2, head_dim 64; 2 over 1,
/// head_dim 128 as Llama-2-7B's) and not (head_dim 80: an odd number of 16-dim steps). f16
/// error, inside the f16 bound.
#[test]
fn prefill_attention_on_tensor_cores_matches_the_cpu() {
    if !cxx_or_skip("prefill_attention_on_tensor_cores_matches_the_cpu") {
        return;
    }
    for (n_q, n_kv, head_dim) in [(4, 2, 64), (2, 2, 80), (2, 1, 128)] {
        let (plan, records) = attention_plan("q0f16", n_q, n_kv, head_dim, None);
        // Distinct tokens: a later key tile holds new maxima (the online softmax rescales).
        let ids: Vec<u32> = (0..222u32).map(|i| (i * 29 + 7) % 256).collect();
        let want = cpu_logits(&plan, &records, &ids);
        let kernels = EmuKernels::compile(
            generate_plan(&plan, &tuning_records(&plan, tuned(128, 4, 2)), "sm_80").unwrap(),
        );
        assert!(
            kernels
                .kernels
                .iter()
                .any(|k| k.signature.starts_with("prefill:attention")
                    && k.source.contains("ldsm_x4_trans(")),
            "prefill attention on tensor cores"
        );
        let mut s = EmuSession::new(&plan, &kernels, &records);
        let mut got = s.forward(&ids[..150], true);
        got.extend(s.forward(&ids[150..220], true));
        for id in &ids[220..] {
            got.extend(s.forward(&[*id], false));
        }
        let e = rel_err(&got, &want);
        eprintln!("attention {n_q}/{n_kv} heads of {head_dim}: rel err {e:.2e}");
        assert!(
            e < F16_TOL && e > 1e-5,
            "{n_q}/{n_kv}×{head_dim}: rel err {e:e}"
        );
    }
}

/// Decode attention against the CPU, after a 100-row prefill: 8 decode steps over 101–108
/// keys, rotary fused, in one block per head (8 warps: several steps of keys per warp, a
/// ragged last one) and split over 4 blocks per head (64 threads, sm_90: with the L2 prefetch of
/// the cached keys before the PDL wait). Shapes for both scans:
/// whole 16-byte chunks per key (`attention::ChunkedKeys`) with every lane busy (f16 64 and
/// 128: 8 and 16 lanes a key; f32 32: 8), with idle lanes (f16 80: 10 chunks on 16 lanes;
/// f32 24: 6 on 8), and one lane per dimension (f32 34: 136-byte rows); grouped heads.
#[test]
fn decode_attention_matches_the_cpu() {
    if !cxx_or_skip("decode_attention_matches_the_cpu") {
        return;
    }
    use crate::codegen::cuda::attention::ChunkedKeys;
    for (scheme, n_q, n_kv, head_dim, chunked) in [
        ("q0f16", 4, 2, 64, true),
        ("q0f16", 2, 1, 128, true),
        ("q0f16", 2, 2, 80, true),
        ("q0f32", 4, 1, 32, true),
        ("q0f32", 2, 2, 24, true),
        ("q0f32", 3, 1, 34, false),
    ] {
        let f16 = scheme == "q0f16";
        assert_eq!(
            ChunkedKeys::fits(head_dim, f16).is_some(),
            chunked,
            "{scheme} head_dim {head_dim}"
        );
        let (plan, records) = attention_plan(scheme, n_q, n_kv, head_dim, Some(head_dim));
        let ids: Vec<u32> = (0..108u32).map(|i| (i * 29 + 7) % 256).collect();
        let want = cpu_logits(&plan, &records, &ids);
        let v = plan.vocab_size;
        // sm_90: the split kernel also prefetches its cached keys before its PDL wait.
        for (tpb, splits, arch) in [(256, 1, "sm_80"), (64, 4, "sm_90")] {
            // Only decode attention takes the configuration under test; every other kernel
            // runs at 64 threads (256-thread norms and GEMVs cost more thread switches for
            // nothing this test checks).
            let tuning = tuning_records_where(
                &plan,
                tuned(64, 1, 1),
                |sig| sig.starts_with("decode:attention"),
                tuned(tpb, 1, splits),
            );
            let kernels = EmuKernels::compile(generate_plan(&plan, &tuning, arch).unwrap());
            let decode = kernels
                .kernels
                .iter()
                .find(|k| k.signature.starts_with("decode:attention"))
                .expect("a decode attention");
            assert_eq!(decode.launch.block[0], tpb, "{scheme} head_dim {head_dim}");
            assert_eq!(
                decode.source.contains("attend_chunked("),
                chunked,
                "{scheme} head_dim {head_dim}"
            );
            assert_eq!(
                decode.source.contains("cached keys and values into L2"),
                arch == "sm_90"
            );
            let mut s = EmuSession::new(&plan, &kernels, &records);
            s.forward(&ids[..100], false);
            let mut got = Vec::new();
            for id in &ids[100..] {
                got.extend(s.forward(&[*id], false));
            }
            let e = rel_err(&got, &want[100 * v..]);
            eprintln!("decode attention {scheme} {n_q}/{n_kv}×{head_dim}, {tpb} threads, {splits} splits: rel err {e:.2e}");
            let tol = if f16 { F16_TOL } else { 1e-4 };
            assert!(
                e < tol,
                "{scheme} {n_q}/{n_kv}×{head_dim} ({tpb}/{splits}): rel err {e:e}"
            );
        }
    }
}

#[test]
fn quantized_matrices_of_every_scheme_match_the_cpu() {
    if !cxx_or_skip("quantized_matrices_of_every_scheme_match_the_cpu") {
        return;
    }
    // Shapes: vocabulary, hidden, intermediate. The second gives the q4 and row-major q8
    // matrices of f16 schemes rows in whole 16-row tiles, so they go to the device in row
    // blocks (codegen::cuda::row_blocks): the embedding, the silu-gated matrix (8 gate and
    // 8 up rows a tile) and the head over 7 groups (the last run of each row block
    // ragged), the down projection over one.
    // The third: 65 groups per row, more than 64 threads' chunks, so the fused norm reads
    // the row twice there (sum of squares, then staging) and once at 128 and 512 threads.
    // The last two: every row whole runs of 4 groups (8 and 4 groups), so the GEMVs also take
    // a weight ring (codegen::cuda::gemv_mma::ring_depth), here 3 and 8 steps deep (5 and 8:
    // `f16_gemv_of_one_hot_rows_is_exact`), over tiles that end inside the head (48 rows) and
    // warps with no chunk (8 groups, 4 warps).
    let blocked = [
        ("q4f16_1", (48, 224, 24)),
        ("q8f16_1", (48, 224, 24)),
        ("q4f16_1", (48, 2080, 24)),
        ("q4f16_1", (48, 256, 128)),
        ("q8f16_1", (48, 256, 128)),
    ];
    let ring = |threads, runs, depth| CudaTuning {
        weight_ring: depth,
        ..tuned(threads, runs, 1)
    };
    let plans = crate::quant::scheme::SCHEMES
        .iter()
        .map(|s| (s.name, (40, 70, 19)))
        .chain(blocked);
    for (name, shape) in plans {
        let (plan, records) = quant_plan(name, shape);
        // 67 rows: two 64-row tiles of the f32 schemes' GEMM, the second ragged (the f16
        // GEMM's 128-row tiles: `f16_gemm_of_one_hot_rows_is_exact`).
        let ids: Vec<u32> = (0..67u32).map(|i| (i * 7 + 3) % shape.0 as u32).collect();
        // The default, and tune-space corners (codegen::cuda::tune_space): the fewest
        // threads with the most rows, and the most threads with few rows.
        // (No attention here: key splits do not apply.)
        let tunings: Vec<CudaTuning> = match name {
            _ if shape.1 % 128 == 0 => vec![tuned(128, 4, 1), ring(128, 2, 8), ring(64, 1, 3)],
            "q4f16_1" => vec![tuned(128, 4, 1), tuned(64, 8, 1), tuned(512, 2, 1)],
            n if n.ends_with("_1") => vec![tuned(128, 4, 1), tuned(64, 8, 1)],
            _ => vec![tuned(128, 4, 1)],
        };
        let what = format!("{name} {shape:?}");
        let in_blocks = generate_plan(&plan, &tuning_records(&plan, tuned(128, 4, 1)), "sm_80")
            .unwrap()
            .iter()
            .flat_map(|k| k.launch.args.iter())
            .filter(|a| a.row_blocks.is_some())
            .count();
        // Embedding, gate/up, down and head: two records each, read by prefill and decode.
        let expected = if blocked.contains(&(name, shape)) {
            16
        } else {
            0
        };
        assert_eq!(
            in_blocks, expected,
            "{what}: weight arguments in row blocks"
        );
        // The decode GEMVs (gate/up, down, head) take each ring tuning's ring.
        for t in tunings.iter().filter(|t| t.weight_ring > 0) {
            let ringed = generate_plan(&plan, &tuning_records(&plan, *t), "sm_80")
                .unwrap()
                .iter()
                .filter(|k| k.source.contains("__shared__ uint4 wring"))
                .count();
            assert_eq!(ringed, 3, "{what} {t:?}: GEMVs with a weight ring");
        }
        check_plan(&plan, &records, &ids, 3, &tunings, 1e-5, &what);
    }
    let _ = DType::F32;
}

/// SmolLM2-135M-Instruct, the real model (skipped without its GGUF, which `.ci/run`
/// fetches; `MLCB_SMOLLM2_GGUF` overrides the path), through the generated CUDA kernels at
/// the preset's default tuning for sm_90: q8f16_1 continues "The capital of France is"
/// with " Paris", and RTN q4f16_1 (biased 4-bit codes on f16 tensor cores in the decode
/// GEMVs and prefill GEMMs) makes the CPU's greedy choices, its logits within the f16
/// bound of the CPU's.
#[test]
fn smollm2_through_the_cuda_kernels_says_paris_and_matches_the_cpu() {
    let test = "smollm2_through_the_cuda_kernels_says_paris_and_matches_the_cpu";
    if !cxx_or_skip(test) {
        return;
    }
    let path = std::env::var_os("MLCB_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("dist/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.is_file() {
        eprintln!("SKIP {test}: no SmolLM2 GGUF (scripts/fetch-smollm2.sh fetches it)");
        return;
    }
    let m = crate::formats::gguf::GgufModel::open(&path).unwrap();
    let a = crate::model::by_name("llama").unwrap();
    let config = a.parse_config(&m.hf_config()).unwrap();
    let tok = crate::runtime::tokenizer::TextTokenizer::from_tokenizer(
        m.tokenizer_json().unwrap().to_string().parse().unwrap(),
        Default::default(),
    );
    let prompt = tok.encode("The capital of France is", false).unwrap();
    let argmax = |row: &[f32]| {
        (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32
    };
    const STEPS: usize = 2;
    for scheme in ["q8f16_1", "q4f16_1"] {
        let built = build(a, &config, &[&m], scheme, 32);
        let plan = crate::codegen::fuse::fuse_for_cuda(built.plan);
        let v = plan.vocab_size;
        // The prefill GEMMs at their default record (a record of rows 4 would run them on
        // wgmma in an sm_90 library).
        let recs = tuning_records_where(&plan, tuned(128, 4, 8), prefill_gemm, tuned(256, 1, 1));
        let k = EmuKernels::compile(generate_plan(&plan, &recs, "sm_90").unwrap());
        assert!(k.kernels.iter().all(|k| k.launch.arch == "sm_90"));
        // Greedy on the emulated kernels: one prefill, then a decode step per token.
        let mut s = EmuSession::new(&plan, &k, &built.records);
        let mut ids = prompt.clone();
        let mut got = s.forward(&prompt, false);
        for step in 0..STEPS {
            let next = argmax(&got[got.len() - v..]);
            ids.push(next);
            if step + 1 < STEPS {
                got.extend(s.forward(&[next], false));
            }
        }
        // The CPU's logits at the same positions (the prompt's last, then each token fed).
        let all = cpu_logits(&plan, &built.records, &ids[..ids.len() - 1]);
        let want = &all[(prompt.len() - 1) * v..];
        let text = tok.decode(&ids[prompt.len()..]).unwrap();
        let e = rel_err(&got, want);
        eprintln!("{scheme}: {text:?}, rel err vs the CPU {e:.2e}");
        assert!(e < F16_TOL, "{scheme}: rel err {e:e} vs the CPU");
        for (i, row) in want.chunks(v).enumerate() {
            assert_eq!(
                argmax(row),
                ids[prompt.len() + i],
                "{scheme}: the CPU's token {i} differs (cuda continued with {text:?})"
            );
        }
        if scheme == "q8f16_1" {
            assert!(text.starts_with(" Paris"), "{scheme}: {text:?}");
        }
    }
}

/// Every candidate the tune stage would time for the decode kernels of two q4f16_1 models (one
/// whose GEMVs take the weight ring, tiny-llama for its attention's key splits) passes the
/// tuner's check against its default configuration (`codegen::tune_check`), on the inputs,
/// calls and buffers the CUDA timer probes a GPU with: no candidate computes something else,
/// and the probe inputs raise no false alarm (a split attention's merge, f16 rounding).
#[test]
fn decode_tune_candidates_pass_the_tuners_check() {
    if !cxx_or_skip("decode_tune_candidates_pass_the_tuners_check") {
        return;
    }
    use crate::codegen::cuda::{half_activations::half_io, tune_space};
    use crate::codegen::tune_check::disagreement;
    // Every decode kernel of the first (its GEMVs, with and without a fused norm and gate, and
    // the head), the attention of the second.
    let plans = [
        (quant_plan("q4f16_1", (48, 256, 128)).0, "decode:"),
        (
            crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 1024),
            "decode:attention",
        ),
    ];
    // (signature, spec, index of its first kernel, how many) over one compiled set.
    let mut groups = Vec::new();
    let mut kernels = Vec::new();
    for (plan, kind) in &plans {
        let half = half_io(plan);
        let f16 = crate::codegen::cuda::f16_prefill(plan);
        for (sig, spec) in crate::codegen::wgsl::spec::specs_by_signature(plan).unwrap() {
            if !sig.starts_with(kind) {
                continue;
            }
            let h = half.get(&sig).copied().unwrap_or_default();
            let mut sources = std::collections::HashSet::new();
            let first = kernels.len();
            for t in tune_space::candidates(&sig, &spec) {
                let Ok(k) = crate::codegen::cuda::generate(&sig, &spec, t, "sm_90", f16, h) else {
                    continue;
                };
                if sources.insert(k.source.clone()) {
                    kernels.push(k);
                }
            }
            groups.push((sig, spec, first, kernels.len() - first));
        }
    }
    let rings = kernels
        .iter()
        .filter(|k| k.launch.tuning.weight_ring > 0)
        .count();
    let splits = kernels
        .iter()
        .filter(|k| k.launch.tuning.kv_splits > 1)
        .count();
    assert!(
        rings >= 3 && splits >= 3,
        "{rings} ring GEMVs, {splits} split attentions"
    );
    let k = EmuKernels::compile(kernels);
    for (sig, spec, first, n) in &groups {
        let default = k.probe(*first, spec);
        assert!(!default.is_empty(), "{sig}: writes nothing");
        for i in first + 1..first + n {
            let why = disagreement(&default, &k.probe(i, spec));
            assert_eq!(why, None, "{sig}: {:?}", k.kernels[i].launch.tuning);
        }
    }
    eprintln!(
        "{} decode signatures, {} candidate kernels ({rings} with a weight ring, {splits} with \
         split keys): all agree with their defaults",
        groups.len(),
        k.kernels.len()
    );
}
