//! Every CUDA kernel variant (each op, each scheme and layout, raw f16/f32/bf16, ragged K, several
//! tuning records) generates CUDA C that NVRTC compiles to PTX for the requested arch. Tests that
//! need NVRTC print a loud SKIP line when it cannot be found.

use super::gemm_wgmma::{self, WGMMA_PTX_ARCH, WGMMA_STAGING};
use super::half_activations::HalfIo;
use super::launch::CudaTuning;
use super::{compile, entry_point, generate, nvrtc};
use crate::codegen::wgsl::spec::{matrix_spec, Fusion, KernelSpec, MatrixStorage, Phase, Unary};
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::WeightStorage;
use crate::quant::scheme::Layout;

fn tunings() -> Vec<CudaTuning> {
    vec![
        CudaTuning {
            threads_per_block: 256,
            rows_per_block: 4,
            kv_splits: 8,
            weight_ring: 0,
        },
        CudaTuning {
            threads_per_block: 64,
            rows_per_block: 8,
            kv_splits: 1,
            weight_ring: 0,
        },
    ]
}

fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc::nvrtc() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: NVRTC not found, PTX not compiled:\n{e}");
            false
        }
    }
}

/// The WGSL tests' specs (every family, scheme, layout, ragged K) plus what only the CUDA kernels
/// have: a raw bf16 matrix, and the fused decode steps (`codegen::fuse`): every decode GEMV with
/// the fused steps in the combinations the fusion pass makes, every attention with rotary.
fn all_specs() -> Vec<KernelSpec> {
    let mut specs = crate::codegen::gpu_tests::all_specs();
    // Decode matrices of whole runs of 4 groups (K = 256) in 16-row tiles: the tensor-core
    // GEMV's row blocks, which take a weight ring (with the fusions below).
    for scheme in ["q4f16_1", "q8f16_1"] {
        let st = WeightStorage::Quantized {
            scheme: scheme.into(),
            layout: Layout::NK,
        };
        specs.push(KernelSpec::Matmul {
            m: matrix_spec(&st, 64, 256, DType::F16).unwrap(),
            bias: None,
            phase: Phase::Decode,
            logits: false,
            fusion: Default::default(),
        });
    }
    let mut fused = Vec::new();
    let activations = [Unary::Gelu, Unary::ReluSquare, Unary::Sigmoid];
    for (i, spec) in specs.iter().enumerate() {
        let act = Some(activations[i % 3]);
        match spec {
            KernelSpec::Matmul {
                m,
                phase: Phase::Decode,
                logits: false,
                ..
            } => {
                // Residual alone; the norm with an activation; norm, silu gate and residual (as
                // Llama's gate/up and down fused); an activation with a residual.
                for (rms_norm, activation, silu_gate, residual) in [
                    (None, None, false, true),
                    (Some(DType::F16), act, false, false),
                    (Some(DType::F32), None, true, true),
                    (None, act, false, true),
                ] {
                    if silu_gate && m.n % 2 != 0 {
                        continue;
                    }
                    let mut s = spec.clone();
                    if let KernelSpec::Matmul { fusion, .. } = &mut s {
                        *fusion = Fusion {
                            rms_norm,
                            activation,
                            silu_gate,
                            residual,
                        };
                    }
                    fused.push(s);
                }
            }
            KernelSpec::Matmul {
                phase: Phase::Prefill,
                logits: false,
                ..
            } => {
                // Prefill fuses only an activation (GPT-NeoX's GELU, RWKV's relu² and sigmoid).
                let mut s = spec.clone();
                if let KernelSpec::Matmul { fusion, .. } = &mut s {
                    fusion.activation = act;
                }
                fused.push(s);
            }
            KernelSpec::Attention { head_dim, .. } => {
                let mut s = spec.clone();
                if let KernelSpec::Attention { rotary_dim, .. } = &mut s {
                    *rotary_dim = Some(head_dim / 2 * 2);
                }
                fused.push(s);
            }
            _ => {}
        }
    }
    assert!(fused.len() > 20, "{}", fused.len());
    specs.extend(fused);
    let bf16 = matrix_spec(
        &WeightStorage::Raw { dtype: DType::BF16 },
        16,
        64,
        DType::BF16,
    )
    .unwrap();
    specs.push(KernelSpec::Matmul {
        m: bf16,
        bias: None,
        phase: Phase::Decode,
        logits: false,
        fusion: Default::default(),
    });
    specs
}

/// The PTX declares the target and a visible entry point with one parameter per argument plus
/// meta, scalar and index.
fn check_ptx(ptx: &str, arch: &str, entry: &str, n_params: usize, what: &str) {
    assert!(
        ptx.contains(&format!(".target {arch}")),
        "{what}: no .target {arch}"
    );
    assert!(
        ptx.contains(&format!(".visible .entry {entry}(")),
        "{what}: no entry {entry}"
    );
    let params = ptx.matches(&format!("{entry}_param_")).count();
    assert!(
        params >= n_params,
        "{what}: {params} params, want {n_params}"
    );
}

fn head_dim_of(spec: &KernelSpec) -> usize {
    match spec {
        KernelSpec::Attention { head_dim, .. } => *head_dim,
        _ => unreachable!("not attention"),
    }
}

/// The f16 GEMM's tuning candidates, then its wgmma staging (sm_90 only; not a candidate until
/// it is measured on a GPU).
fn f16_gemm_variants(spec: &KernelSpec) -> Vec<CudaTuning> {
    let mut c = super::tune_space::candidates("prefill:matmul", spec);
    c.push(CudaTuning {
        rows_per_block: WGMMA_STAGING,
        ..c[0]
    });
    c
}

#[test]
fn every_variant_compiles_to_ptx() {
    use rayon::prelude::*;
    if !nvrtc_or_skip("every_variant_compiles_to_ptx") {
        return;
    }
    // Each spec once, alternating tuning record and arch (NVRTC programs compile in parallel).
    let specs = all_specs();
    // And ptxas, where installed, assembles the PTX (its inline PTX is text to NVRTC) of one
    // kernel of each kind (below): no f16 prefill GEMM spills, no wgmma product waits at its
    // issue.
    let ptxas = super::ptxas::ptxas();
    let assembled = std::sync::atomic::AtomicUsize::new(0);
    let on_wgmma = std::sync::atomic::AtomicUsize::new(0);
    let rings = std::sync::atomic::AtomicUsize::new(0);
    let kinds = std::sync::Mutex::new(std::collections::HashSet::new());
    if ptxas.is_none() {
        eprintln!(
            "SKIP every_variant_compiles_to_ptx's ptxas checks: no ptxas (pip install 'nvidia-cuda-nvcc==13.0.*', or MLCB_PTXAS)"
        );
    }
    // The f16 GEMM's candidates in turn (below) meet both archs.
    let gemm_candidates: std::collections::BTreeSet<_> = specs
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            matches!(
                s,
                KernelSpec::Matmul {
                    phase: Phase::Prefill,
                    ..
                }
            )
        })
        .map(|(i, s)| {
            let c = f16_gemm_variants(s);
            let t = c[(i / 2) % c.len()];
            (t.threads_per_block, t.rows_per_block, i % 2)
        })
        .collect();
    assert_eq!(gemm_candidates.len(), 10, "{gemm_candidates:?}");
    let count = specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let tuning = tunings()[i % 2];
            let arch = ["sm_80", "sm_90"][i % 2];
            // Prefill matmuls both ways: 3xTF32 (f32 schemes) and f16 tensor cores.
            let prefill = matches!(
                spec,
                KernelSpec::Matmul {
                    phase: Phase::Prefill,
                    ..
                }
            );
            // Attention both with an f32 and an f16 KV cache (f16 schemes).
            let attention = matches!(spec, KernelSpec::Attention { .. });
            let f16s: &[bool] = if prefill || attention {
                &[false, true]
            } else {
                &[false]
            };
            // Attention takes its phase from the signature: the query-tiled prefill kernel and
            // the one-row-per-block kernel.
            // Fused rotary is decode-only.
            let sigs: &[&str] = if spec.fused() && matches!(spec, KernelSpec::Attention { .. }) {
                &["decode:attention"]
            } else if matches!(spec, KernelSpec::Attention { .. }) {
                &["prefill:attention", "decode:attention"]
            } else {
                &["test"]
            };
            // Decode attention both whole and split over blocks.
            let splits: &[u32] = if matches!(spec, KernelSpec::Attention { .. }) {
                &[1, 8]
            } else {
                &[1]
            };
            let variants = f16s
                .iter()
                .flat_map(|f| sigs.iter().map(move |s| (f, s)))
                .flat_map(|(f, s)| splits.iter().map(move |k| (*f, *s, *k)));
            // And with f16 activations where the kernel may hold them (`half_activations`).
            let variants = variants.flat_map(|(f16, sig, kv_splits)| {
                let half = match spec {
                    // Both sides: the output of a fused activation feeds the next GEMM.
                    KernelSpec::Matmul {
                        phase: Phase::Prefill,
                        logits,
                        ..
                    } if f16 => Some(HalfIo {
                        input: true,
                        out: !logits,
                    }),
                    KernelSpec::RmsNorm { .. }
                    | KernelSpec::LayerNorm { .. }
                    | KernelSpec::SiluMul { .. } => Some(HalfIo {
                        input: false,
                        out: true,
                    }),
                    KernelSpec::Attention { head_dim, .. }
                        if sig == "prefill:attention"
                            && super::attention_mma::fits(f16, *head_dim) =>
                    {
                        Some(HalfIo {
                            input: false,
                            out: true,
                        })
                    }
                    _ => None,
                };
                std::iter::once(HalfIo::default())
                    .chain(half)
                    .map(move |h| (f16, sig, kv_splits, h))
            });
            // An f16 GEMM over an f16 activation: one of its tuning candidates (warp tilings ×
            // register or cp.async staging) or wgmma in turn, so the specs cover each with both
            // archs; over an f32 one, wgmma where the arch takes it.
            let variants = variants.map(|(f16, sig, kv_splits, half)| {
                let tuning = if f16 && prefill && half.input {
                    let c = f16_gemm_variants(spec);
                    c[(i / 2) % c.len()]
                } else if f16 && prefill && gemm_wgmma::applies(WGMMA_STAGING, arch) {
                    CudaTuning {
                        rows_per_block: WGMMA_STAGING,
                        ..tuning
                    }
                } else {
                    CudaTuning {
                        kv_splits,
                        ..tuning
                    }
                };
                (f16, sig, tuning, half)
            });
            // The tensor-core decode GEMV also with its weight ring, where its matrix takes one.
            let ring = matches!(spec, KernelSpec::Matmul { m, phase: Phase::Decode, .. }
                if super::gemv_mma::ring_applies(m));
            let variants = variants.chain(ring.then(|| {
                let t = CudaTuning {
                    threads_per_block: 128,
                    weight_ring: super::gemv_mma::MAX_RING as u32,
                    ..tunings()[i % 2]
                };
                (false, "test", t, HalfIo::default())
            }));
            for (f16, sig, tuning, half) in variants {
                let k = generate(sig, spec, tuning, arch, f16, half).unwrap();
                let ptx = compile(&k).unwrap_or_else(|e| {
                    panic!("{spec:?} {tuning:?} f16 {f16}:\n{e}\n{}", k.source)
                });
                let ptx = String::from_utf8(ptx).unwrap();
                // wgmma where asked for, except for shapes whose operands stage value by value
                // (ragged K): those keep mma.sync.
                let wgmma = k.launch.arch == WGMMA_PTX_ARCH;
                let main_weights = matches!(spec, KernelSpec::Matmul { m, .. }
                    if m.k % 8 == 0 && (m.storage == MatrixStorage::Raw(DType::F16)
                        || matches!(m.storage, MatrixStorage::Quant(q) if [3, 4, 8].contains(&q.bits))));
                if f16 && prefill && gemm_wgmma::applies(tuning.rows_per_block, arch) && main_weights {
                    assert!(wgmma, "{spec:?}: no wgmma");
                }
                if wgmma {
                    on_wgmma.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                check_ptx(
                    &ptx,
                    if wgmma { WGMMA_PTX_ARCH } else { arch },
                    &k.entry_point,
                    k.launch.args.len() + 3,
                    &format!("{spec:?} f16 {f16}"),
                );
                // One kernel of each kind: per entry point, arch, f16 and phase (their inline
                // PTX comes from the same few helpers), and for the f16 prefill GEMMs (spills,
                // wgmma) per tuning, activation type, weight storage, ragged edges and
                // epilogue too.
                let gemm_kind = match spec {
                    KernelSpec::Matmul { m, fusion, .. } if f16 && prefill => {
                        let storage = match m.storage {
                            MatrixStorage::Quant(q) => format!("{}:{:?}:{}", q.bits, q.layout, q.word16),
                            MatrixStorage::Raw(d) => format!("{d:?}"),
                        };
                        format!(
                            "{tuning:?} {half:?} {storage} {} {} {fusion:?}",
                            m.k % 32 == 0,
                            m.n % 128 == 0
                        )
                    }
                    KernelSpec::Matmul { m, fusion, .. } if tuning.weight_ring > 0 => {
                        format!("weight ring {:?} {fusion:?}", m.storage)
                    }
                    _ => String::new(),
                };
                let first_of_kind = kinds.lock().unwrap().insert((
                    k.entry_point.clone(),
                    k.launch.arch.clone(),
                    f16,
                    sig.to_string(),
                    gemm_kind,
                ));
                if let Some(ptxas) = ptxas.as_ref().filter(|_| first_of_kind) {
                    let a =
                        super::ptxas::assemble(ptxas, &ptx, &k.launch.arch).unwrap_or_else(|log| {
                            panic!("{spec:?} {tuning:?} f16 {f16}: ptxas failed:\n{log}")
                        });
                    // The f16 schemes' own weights (3/4/8-bit codes, raw f16, K a multiple of
                    // 8); the value-by-value decoders (f32 weights, which only this test puts
                    // in an f16 GEMM; ragged K, which no model has) spill a little.
                    if f16 && prefill && main_weights || tuning.weight_ring > 0 {
                        assert_eq!(a.spill_store_bytes, 0, "{spec:?} {tuning:?}: {}", a.log);
                        assert!(a.registers > 0, "{}", a.log);
                    }
                    if tuning.weight_ring > 0 {
                        rings.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    assert!(
                        !a.log.contains("serialized"),
                        "{spec:?} {tuning:?}: wgmma serialized:\n{}",
                        a.log
                    );
                    assembled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if wgmma {
                    assert!(
                        ptx.contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16"),
                        "{spec:?}"
                    );
                } else if f16 && prefill {
                    assert!(ptx.contains("mma.sync.aligned.m16n8k16"), "{spec:?}");
                    // Its tiles are in shared memory (read from the PTX as `compile` checks
                    // them against the 48 KiB limit).
                    let smem = nvrtc::static_shared_bytes(&ptx);
                    assert!(
                        smem > 16 * 1024,
                        "{spec:?} {tuning:?}: {smem} bytes of shared memory"
                    );
                }
                // The cache's element as the runtime sizes it.
                if attention {
                    let kv = k
                        .launch
                        .args
                        .iter()
                        .find(|a| a.part.as_deref() == Some("k"));
                    let want = if super::attention::kv_f16(f16, head_dim_of(spec)) {
                        "f16"
                    } else {
                        "f32"
                    };
                    assert_eq!(kv.unwrap().elem, want, "{spec:?} f16 {f16}");
                }
                // (Fused rotary is exempt: precise `sincosf` reduces huge angles on a rare path
                // that keeps a 28-byte table in local memory, as the rotary kernel's does.)
                if (f16 && prefill) || (sig.contains(":attention") && !spec.fused()) {
                    // Staged registers, accumulators, per-query state and decode attention's
                    // per-step keys stay in registers.
                    assert!(!ptx.contains(".local"), "{spec:?}: local memory\n{ptx}");
                }
            }
        })
        .count();
    assert!(count > 120, "{count}");
    let on_wgmma = on_wgmma.load(std::sync::atomic::Ordering::Relaxed);
    assert!(on_wgmma > 20, "{on_wgmma} wgmma kernels");
    if ptxas.is_some() {
        let n = assembled.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n > 100, "{n} kernels assembled");
        let rings = rings.load(std::sync::atomic::Ordering::Relaxed);
        assert!(rings >= 4, "{rings} GEMVs with a weight ring assembled");
        eprintln!("ptxas assembled {n} kernels ({rings} GEMVs with a weight ring)");
    }
}

/// The f16 GEMM's activation ring (`gemm_f16::x_ring`) changes the kernel exactly where its
/// activation is f16 in rows of whole 16-byte chunks; elsewhere the candidate asking for it
/// generates the register-staged kernel (which the tune stage then times once).
#[test]
fn the_activation_ring_applies_to_f16_activations_only() {
    use super::gemm_f16::X_RING_AHEAD;
    for spec in all_specs() {
        let KernelSpec::Matmul {
            m,
            phase: Phase::Prefill,
            ..
        } = &spec
        else {
            continue;
        };
        for input in [false, true] {
            let half = HalfIo { input, out: false };
            let gen = |rows_per_block| {
                let t = CudaTuning {
                    threads_per_block: 256,
                    rows_per_block,
                    kv_splits: 1,
                    weight_ring: 0,
                };
                generate("prefill:matmul", &spec, t, "sm_90", true, half)
                    .unwrap()
                    .source
            };
            let (regs, ring) = (gen(1), gen(X_RING_AHEAD));
            let applies = input && m.k % 8 == 0;
            assert_eq!(regs != ring, applies, "{spec:?} f16 input {input}");
            assert_eq!(ring.contains("cp_async16(xs_dst"), applies, "{spec:?}");
            // Raw f16 weights take their own ring with it.
            let raw_f16 = m.storage == MatrixStorage::Raw(DType::F16);
            assert_eq!(
                ring.contains("cp_async16(ws_dst"),
                applies && raw_f16,
                "{spec:?}"
            );
            assert!(!regs.contains("cp_async16(xs_dst"), "{spec:?}");
        }
    }
}

#[test]
fn arguments_follow_the_documented_order() {
    let spec = crate::codegen::gpu_tests::q4_decode_matmul_with_bias();
    let k = generate(
        "decode:matmul[x]",
        &spec,
        tunings()[0],
        "sm_80",
        false,
        HalfIo::default(),
    )
    .unwrap();
    let roles: Vec<(&str, &str, Option<usize>, &str, bool)> = k
        .launch
        .args
        .iter()
        .map(|a| {
            (
                a.role.as_str(),
                a.op_field.as_str(),
                a.record,
                a.elem.as_str(),
                a.write,
            )
        })
        .collect();
    assert_eq!(
        roles,
        vec![
            ("activation", "input", None, "f32", false),
            ("weight", "weight", Some(0), "u32", false),
            ("weight", "weight", Some(1), "f16", false),
            ("weight", "bias", Some(0), "f16", false),
            ("activation", "out", None, "f32", true),
        ]
    );
    assert_eq!(k.entry_point, entry_point(&spec));
    assert_eq!(k.entry_point, "mlcb_matmul_gemv_nk");
    assert_eq!(k.launch.block, [256, 1, 1]);
    // q4 rows of an f16 scheme: the tensor-core GEMV, the tuning's 4 runs of 16 rows (the
    // mma's M) per block: all 64 rows in one; one activation row.
    assert!(k.source.contains("mma.sync"));
    assert_eq!(k.launch.grid[0].workgroups(1, 1), 1);
    assert_eq!(k.launch.grid[1].workgroups(1, 1), 1);
    assert_eq!(k.launch.arch, "sm_80");
    assert!(k.source.contains(
        "mlcb_matmul_gemv_nk(\n    const float* __restrict__ x,\n    const unsigned* __restrict__ w_q,\n    const unsigned short* __restrict__ w_s,\n    const unsigned short* __restrict__ bias,\n    float* __restrict__ y,\n    const unsigned* __restrict__ meta,\n    float scalar,\n    unsigned index)"
    ), "{}", k.source);
    // q4: one 16-byte chunk is one group of 32 codes; 2 chunks per row of 64.
    assert!(k.source.contains("constexpr unsigned CPR = 2u;"));

    // Fused steps: the norm weight follows the input (eps is the scalar); the residual comes
    // before the output, neither `__restrict__` (the residual is usually the output); a silu
    // gate halves the output rows, so the grid.
    let KernelSpec::Matmul {
        m,
        bias,
        phase,
        logits,
        ..
    } = spec
    else {
        unreachable!()
    };
    let gated = KernelSpec::Matmul {
        m,
        bias,
        phase,
        logits,
        fusion: Fusion {
            rms_norm: Some(DType::F16),
            activation: None,
            silu_gate: true,
            residual: true,
        },
    };
    let k = generate(
        "decode:matmul[x]",
        &gated,
        tunings()[0],
        "sm_80",
        false,
        HalfIo::default(),
    )
    .unwrap();
    let fields: Vec<&str> = k.launch.args.iter().map(|a| a.op_field.as_str()).collect();
    assert_eq!(
        fields,
        ["input", "norm", "weight", "weight", "bias", "residual", "out"]
    );
    assert_eq!(k.launch.params.scalar.as_deref(), Some("eps"));
    assert!(
        k.source.contains("const float* res,\n    float* y,"),
        "{}",
        k.source
    );
    assert!(k.source.contains("constexpr unsigned OUT_N = 32u;"));
    // 8 gate and 8 up rows per mma tile, the tuning's 4 tiles per block: the 32 rows in one.
    assert!(k.source.contains("constexpr unsigned RPB = 8u;"));
    assert!(k.source.contains("constexpr unsigned TILES = 4u;"));
    assert_eq!(k.launch.grid[0].workgroups(1, 1), 1);
}

/// A plain `[n, k]` matmul of `phase` over a linear weight stored as `scheme` stores it.
fn linear_matmul(scheme: &str, n: usize, k: usize, phase: Phase) -> KernelSpec {
    let s = crate::quant::scheme::scheme(scheme).unwrap();
    let storage = match s.layout_for(crate::quant::scheme::TensorRole::Linear) {
        Some(layout) => WeightStorage::Quantized {
            scheme: scheme.into(),
            layout,
        },
        None => WeightStorage::Raw { dtype: DType::F16 },
    };
    KernelSpec::Matmul {
        m: matrix_spec(&storage, n, k, s.model_dtype).unwrap(),
        bias: None,
        phase,
        logits: false,
        fusion: Default::default(),
    }
}

#[test]
fn gemv_chunks_cover_each_scheme_group() {
    // (scheme, values per 16-byte chunk, K): q3 = 8 u16 words × 5, q4 = 4 × 8, q8 = 4 × 4
    // (q4f16_1 and q8f16_1 run on tensor cores, `tensor_core_gemv_takes_q4_rows_of_f16_schemes`,
    // unless a row has more groups than that GEMV stages: q8f16_1 at K = 20512, 641 groups).
    for (scheme, vpc, k) in [
        ("q3f16_1", 40, 64),
        ("q4f32_1", 32, 64),
        ("q8f16_1", 16, 20512),
    ] {
        let spec = linear_matmul(scheme, 8, k, Phase::Decode);
        let k = generate("x", &spec, tunings()[0], "sm_80", false, HalfIo::default()).unwrap();
        assert!(
            k.source
                .contains(&format!("constexpr unsigned VPC = {vpc}u;")),
            "{scheme}"
        );
        assert!(k.source.contains("reinterpret_cast<const uint4*>(w_q)"));
    }
}

#[test]
fn tensor_core_gemv_takes_q4_rows_of_f16_schemes() {
    // Which decode GEMV each storage gets (K = 64): q4 codes of an f16 scheme (row-major or
    // K-major words) and q8 row-major ones, the tensor-core one; f32 schemes, other widths and
    // K-major q8, the f32 ones.
    // (scheme, tensor cores, rows per block: on tensor cores the tuning's 4 runs of 16, a lane
    // per row for the f32 GEMV over K-major words, else the tuning's 4)
    for (scheme, tensor_cores, rows) in [
        ("q4f16_1", true, 64),
        ("q4f16_0", true, 64),
        ("q4f32_0", false, 32),
        ("q4f32_1", false, 4),
        ("q8f16_1", true, 64),
        ("q8f16_0", false, 32),
        ("q3f16_1", false, 4),
        ("q0f16", false, 4),
    ] {
        let spec = linear_matmul(scheme, 40, 64, Phase::Decode);
        let f16 = crate::quant::scheme::scheme(scheme).unwrap().model_dtype == DType::F16;
        let k = generate("x", &spec, tunings()[0], "sm_80", f16, HalfIo::default()).unwrap();
        assert_eq!(k.source.contains("mma.sync"), tensor_cores, "{scheme}");
        assert_eq!(tunings()[0].rows_per_block, 4);
        assert_eq!(
            k.launch.grid[0].workgroups(1, 1),
            40u64.div_ceil(rows as u64),
            "{scheme}"
        );
    }
}

/// An untuned tensor-core GEMV gets more warps where its grid is small (Llama-2-7B shapes): the
/// attention output and down projections (256 blocks) 8, the rest 4; a tiny matrix 4 (its rows
/// have no work for more); the f32 GEMV keeps 128 threads.
#[test]
fn untuned_tensor_core_gemvs_fill_the_gpu() {
    let sig = "decode:matmul[x]";
    // Runs of mma rows: 2 where one wave of blocks (132 SMs × 6 blocks of 4 warps, 4-bit) does
    // not hold the grid (gate/up: 1376 blocks; the head: 2000), else 1 (qkv: 768).
    for (scheme, n, k, silu, threads, runs) in [
        ("q4f16_1", 4096, 4096, false, 256, 1),
        ("q4f16_1", 4096, 11008, false, 256, 1),
        ("q4f16_1", 12288, 4096, false, 128, 1),
        ("q4f16_1", 22016, 4096, true, 128, 2),
        ("q4f16_1", 32000, 4096, false, 128, 2),
        ("q4f16_1", 256, 64, false, 128, 1),
        ("q4f16_0", 4096, 4096, false, 256, 1),
        ("q8f16_1", 4096, 4096, false, 256, 1),
        ("q4f32_1", 4096, 4096, false, 128, 4),
        ("q0f16", 4096, 4096, false, 128, 4),
    ] {
        let mut spec = linear_matmul(scheme, n, k, Phase::Decode);
        if let KernelSpec::Matmul { fusion, .. } = &mut spec {
            fusion.silu_gate = silu;
        }
        let t = super::tune_space::default_for(sig, &spec);
        assert_eq!(t.threads_per_block, threads, "{scheme} [{n}, {k}]");
        assert_eq!(t.rows_per_block, runs, "{scheme} [{n}, {k}]");
        assert!(super::tune_space::candidates(sig, &spec).contains(&t));
    }
}

#[test]
fn f16_prefill_stages_weights_as_the_storage_allows() {
    // (scheme, how a thread stages weights, values per unit) for K = 64: sym 4/8-bit codes a
    // thread's equal share of the 128×32 tile (q4 NK: 8 bytes; q8 NK: 16) or one word (KN),
    // decoded in f16 pairs; raw f16 in 16-byte chunks; q3 in units of 8 values, the (at most 3)
    // words they span.
    for (scheme, regs, vpu) in [
        ("q4f16_1", "uint2 wr_v[UPT]; unsigned short wr_s[UPT];", 16),
        ("q8f16_1", "uint4 wr_v[UPT]; unsigned short wr_s[UPT];", 16),
        (
            "q4f16_0",
            "unsigned wr_v[UPT]; unsigned short wr_s[UPT];",
            8,
        ),
        ("q0f16", "uint4 wr_v[UPT];", 8),
        // 5 codes per 16-bit word, 40 per chunk: not a divisor of the 32-wide K step.
        (
            "q3f16_1",
            "unsigned wr_c[UPT][3]; unsigned short wr_s[UPT];",
            8,
        ),
        (
            "q3f16_0",
            "unsigned wr_c[UPT][3]; unsigned short wr_s[UPT];",
            8,
        ),
    ] {
        let spec = linear_matmul(scheme, 200, 64, Phase::Prefill);
        let k = generate("x", &spec, tunings()[0], "sm_80", true, HalfIo::default()).unwrap();
        assert!(k.source.contains(regs), "{scheme}:\n{}", k.source);
        assert!(
            k.source
                .contains(&format!("constexpr unsigned VPU = {vpu}u;")),
            "{scheme}"
        );
        assert_eq!(k.launch.block, [256, 1, 1], "{scheme}");
        // 200 columns in tiles of 128; 70 rows, then 130, in tiles of 128.
        assert_eq!(k.launch.grid[0].workgroups(70, 70), 2);
        assert_eq!(k.launch.grid[1].workgroups(70, 70), 1);
        assert_eq!(k.launch.grid[1].workgroups(130, 130), 2);
        // The f32 schemes' kernel for the same spec is the 3xTF32 one.
        let f32k = generate("x", &spec, tunings()[0], "sm_80", false, HalfIo::default()).unwrap();
        assert!(f32k.source.contains("m16n8k8") && !f32k.source.contains("m16n8k16"));
        assert!(k.source.contains("m16n8k16"));
    }
}

#[test]
fn bad_tunings_are_refused() {
    let m = matrix_spec(&WeightStorage::Raw { dtype: DType::F32 }, 8, 64, DType::F32).unwrap();
    let spec = KernelSpec::Matmul {
        m,
        bias: None,
        phase: Phase::Decode,
        logits: false,
        fusion: Default::default(),
    };
    // 2 warps cannot split 64 rows evenly the other way round: fine (32 rows per warp).
    let ok = CudaTuning {
        threads_per_block: 64,
        rows_per_block: 64,
        kv_splits: 1,
        weight_ring: 0,
    };
    assert!(generate("x", &spec, ok, "sm_80", false, HalfIo::default()).is_ok());
    let big = KernelSpec::Attention {
        n_q_heads: 2,
        n_kv_heads: 1,
        head_dim: 4096,
        rotary_dim: None,
    };
    let t = CudaTuning {
        threads_per_block: 1024,
        rows_per_block: 1,
        kv_splits: 1,
        weight_ring: 0,
    };
    let e = generate("a", &big, t, "sm_80", false, HalfIo::default()).unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
    assert!(super::arch_str("sm_70").is_err());
}

#[test]
fn ptx_is_deterministic_and_nvrtc_is_versioned() {
    if !nvrtc_or_skip("ptx_is_deterministic_and_nvrtc_is_versioned") {
        return;
    }
    let n = nvrtc::nvrtc().unwrap();
    assert!(n.major >= 12, "{n:?}");
    let spec = KernelSpec::Attention {
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rotary_dim: None,
    };
    let k = generate("a", &spec, tunings()[0], "sm_90", false, HalfIo::default()).unwrap();
    assert_eq!(compile(&k).unwrap(), compile(&k).unwrap());
}

#[test]
fn compile_errors_name_the_kernel_and_carry_the_log() {
    if !nvrtc_or_skip("compile_errors_name_the_kernel_and_carry_the_log") {
        return;
    }
    let e = nvrtc::compile(
        "decode:broken[1]",
        "extern \"C\" __global__ void f() { int x = ; }",
        "sm_80",
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("decode:broken[1]") && msg.contains("sm_80"),
        "{msg}"
    );
    assert!(msg.contains("error"), "NVRTC's log: {msg}");
}

/// Decode kernels for sm_90 start by waiting for the kernel before them (so the runtime may
/// launch them early, programmatic dependent launch) and say so in their launch JSON, the
/// decode GEMVs after prefetching the start of their weight rows and decode attention its
/// cached keys and values; prefill kernels and every kernel for older architectures do neither
/// (the instruction needs sm_90).
#[test]
fn decode_kernels_for_sm_90_wait_for_the_kernel_before() {
    let plan = crate::codegen::fuse::fuse_for_cuda(crate::model::testing::lowered_plan(
        "tiny-llama",
        "llama",
        "q4f16_1",
        32,
    ));
    let records = super::tune_space::default_records(&plan);
    for cuda_arch in ["sm_80", "sm_89", "sm_90"] {
        let kernels = super::generate_plan(&plan, &records, cuda_arch).unwrap();
        for k in &kernels {
            let want = cuda_arch == "sm_90" && k.signature.starts_with("decode:");
            assert_eq!(k.launch.pdl, want, "{cuda_arch} {}", k.signature);
            assert_eq!(
                k.source.contains("griddepcontrol.wait"),
                want,
                "{cuda_arch} {}",
                k.signature
            );
            // Decode GEMVs over row-major weights ask L2 for their rows before they wait, and
            // decode attention for its cached keys and values.
            let prefetches = k.signature.contains(":matmul")
                || k.signature.contains(":logits")
                || k.signature.contains(":attention");
            let prefetch = k.source.find("prefetch_l2(reinterpret_cast");
            assert_eq!(
                prefetch.is_some(),
                want && prefetches,
                "{cuda_arch} {}",
                k.signature
            );
            if let Some(at) = prefetch {
                assert!(
                    at < k.source.find("griddepcontrol.wait").unwrap(),
                    "{}",
                    k.signature
                );
            }
        }
        if cuda_arch == "sm_90"
            && nvrtc_or_skip("decode_kernels_for_sm_90_wait_for_the_kernel_before")
        {
            let k = kernels
                .iter()
                .find(|k| k.signature.starts_with("decode:attention"))
                .unwrap();
            let ptx = String::from_utf8(compile(k).unwrap()).unwrap();
            assert!(ptx.contains("griddepcontrol.wait"), "{ptx}");
            assert!(ptx.contains("griddepcontrol.launch_dependents"), "{ptx}");
        }
    }
}
