//! `mlcb bench DIST_DIR`: prefill and decode speed on a synthetic prompt, and peak memory.

use crate::runtime::artifact::Artifact;
use crate::runtime::backend::{resolve_device, with_session};
use crate::runtime::generate::rate;
use crate::runtime::sampling::argmax;
use crate::runtime::Session;
use crate::user_bail;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The artifact folder `mlcb build` wrote (dist/<model>-<quant>).
    pub dist_dir: PathBuf,
    /// Tokens in the synthetic prompt (one prefill call).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to decode after it, one call each.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    #[command(flatten)]
    pub threads: crate::cli::threads::ThreadsArg,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Backend to run on: cpu or wgpu (default: the library's target).
    #[arg(long)]
    pub device: Option<String>,
    /// wgpu only: the adapter to use, by a part of its name (e.g. `llvmpipe`, `nvidia`);
    /// default: the best GPU of the library's backend.
    #[arg(long)]
    pub adapter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchResult {
    pub prompt_len: usize,
    pub gen_len: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// A deterministic prompt of `len` ids below `vocab`, avoiding stop tokens.
pub fn synthetic_prompt(len: usize, vocab: usize, stops: &[u32]) -> Vec<u32> {
    (0..len)
        .map(|i| {
            let mut id = ((i as u64 * 7919 + 13) % vocab as u64) as u32;
            while stops.contains(&id) && vocab > stops.len() {
                id = (id + 1) % vocab as u32;
            }
            id
        })
        .collect()
}

/// One prefill of `prompt`, then `gen_len` greedy decode steps (stop tokens ignored).
pub fn bench_session(
    session: &mut dyn Session,
    prompt: &[u32],
    gen_len: usize,
    vocab: usize,
) -> Result<BenchResult> {
    session.reset();
    let t = Instant::now();
    let mut logits = session.forward(prompt, false)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..gen_len {
        let row = logits
            .get(..vocab)
            .context("backend returned too few logits")?;
        let next = argmax(row);
        logits = session.forward(&[next], false)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok(BenchResult {
        prompt_len: prompt.len(),
        gen_len,
        prefill_s,
        decode_s,
        prefill_tok_s: rate(prompt.len(), prefill_s),
        decode_tok_s: rate(gen_len, decode_s),
    })
}

/// Peak resident memory of this process in bytes (`VmHWM`), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn execute(args: BenchArgs) -> Result<()> {
    let artifact = Artifact::open_for(&args.dist_dir, args.device.as_deref())?;
    let device = resolve_device(&artifact, args.device.as_deref())?;
    if args.prompt_len == 0 {
        user_bail!("--prompt-len must be at least 1");
    }
    let ctx = artifact.context_len();
    if args.prompt_len + args.gen_len > ctx {
        user_bail!(
            "--prompt-len {} + --gen-len {} exceed the context of {ctx} tokens",
            args.prompt_len,
            args.gen_len
        );
    }
    let vocab = artifact.vocab_size();
    let prompt = synthetic_prompt(args.prompt_len, vocab, &artifact.stop_tokens());
    let (result, threads) = args.threads.install(|threads| {
        let r = with_session(&artifact, device, args.adapter.as_deref(), |s| {
            bench_session(s, &prompt, args.gen_len, vocab)
        })?;
        Ok((r, threads))
    })?;
    let peak = peak_rss_bytes();
    if args.json {
        let v = serde_json::json!({
            "model": artifact.config.local_id,
            "device": device.name(),
            "threads": threads,
            "prompt_len": result.prompt_len,
            "gen_len": result.gen_len,
            "prefill_s": result.prefill_s,
            "decode_s": result.decode_s,
            "prefill_tok_s": result.prefill_tok_s,
            "decode_tok_s": result.decode_tok_s,
            "peak_rss_bytes": peak,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} on {device} ({threads} thread{})",
            artifact.config.local_id,
            if threads == 1 { "" } else { "s" }
        );
        println!(
            "prefill: {} tokens in {:.3} s = {:.1} tok/s",
            result.prompt_len, result.prefill_s, result.prefill_tok_s
        );
        println!(
            "decode:  {} tokens in {:.3} s = {:.1} tok/s",
            result.gen_len, result.decode_s, result.decode_tok_s
        );
        match peak {
            Some(b) => println!("peak RSS: {:.1} MiB", b as f64 / (1024.0 * 1024.0)),
            None => println!("peak RSS: unknown (no /proc/self/status)"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::generate::tests::ScriptSession;

    #[test]
    fn synthetic_prompt_is_in_range_and_avoids_stops() {
        let p = synthetic_prompt(300, 50, &[13, 0]);
        assert_eq!(p.len(), 300);
        assert!(p.iter().all(|&t| t < 50 && t != 13 && t != 0));
        assert_eq!(
            p[0], 14,
            "13 is a stop token, so the first id moves on to 14"
        );
        assert_eq!(p, synthetic_prompt(300, 50, &[13, 0]));
    }

    #[test]
    fn one_prefill_then_one_call_per_token() {
        let mut s = ScriptSession::new(vec![3, 4, 5, 6], 10, 64);
        let r = bench_session(&mut s, &[1, 2, 3], 3, 10).unwrap();
        assert_eq!(s.calls, vec![vec![1, 2, 3], vec![3], vec![4], vec![5]]);
        assert_eq!((r.prompt_len, r.gen_len), (3, 3));
    }

    #[test]
    fn reads_vm_hwm() {
        let status = "Name:\tmlcb\nVmPeak:\t  9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
