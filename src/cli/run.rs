//! `mlcb run DIST_DIR --prompt TEXT`: one completion, streamed to stdout.

use crate::cli::threads::ThreadsArg;
use crate::runtime::artifact::Artifact;
use crate::runtime::backend::{resolve_device, with_session};
use crate::runtime::chat_config::ChatConfig;
use crate::runtime::generate::{generate, GenerateOptions};
use crate::runtime::sampling::{Sampler, SamplingParams};
use crate::runtime::tokenizer::TextTokenizer;
use crate::user_bail;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

/// Sampling flags shared by `run` and `chat`; unset ones take the artifact's chat-config values.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Softmax temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalty (> 1 discourages) for tokens already in the prompt or the reply.
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Random seed; the same seed gives the same output. Default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
}

impl SamplingArgs {
    pub fn params(&self, config: &ChatConfig) -> Result<SamplingParams> {
        let p = SamplingParams {
            greedy: self.greedy,
            temperature: self.temperature.unwrap_or(config.temperature),
            top_p: self.top_p.unwrap_or(config.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(config.repetition_penalty),
        };
        p.validate()?;
        Ok(p)
    }

    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The artifact folder `mlcb build` wrote (dist/<model>-<quant>).
    pub dist_dir: PathBuf,
    /// The prompt text (used as is, no chat template).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (default: max_gen_len of the chat config).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Backend to run on: cpu or wgpu (default: the library's target).
    #[arg(long)]
    pub device: Option<String>,
    /// wgpu only: the adapter to use, by a part of its name (e.g. `llvmpipe`, `nvidia`);
    /// default: the best GPU of the library's backend.
    #[arg(long)]
    pub adapter: Option<String>,
    #[command(flatten)]
    pub threads: ThreadsArg,
}

/// Stop ids: the artifact's, else the tokenizer's EOS.
pub fn stop_tokens(artifact: &Artifact, tokenizer: &TextTokenizer) -> Vec<u32> {
    let mut stops = artifact.stop_tokens();
    if stops.is_empty() {
        stops.extend(tokenizer.eos_id());
    }
    stops
}

/// A user error when `n` prompt tokens do not fit the artifact's context.
pub fn check_fits(artifact: &Artifact, n: usize) -> Result<()> {
    let ctx = artifact.context_len();
    if n > ctx {
        user_bail!(
            "the prompt has {n} tokens but the context of {} holds {ctx}; shorten it",
            artifact.dir.display()
        );
    }
    Ok(())
}

pub fn execute(args: RunArgs) -> Result<()> {
    args.threads.clone().install(|_| run_on_pool(args))
}

fn run_on_pool(args: RunArgs) -> Result<()> {
    let artifact = Artifact::open_for(&args.dist_dir, args.device.as_deref())?;
    let device = resolve_device(&artifact, args.device.as_deref())?;
    let tokenizer = TextTokenizer::from_dir(&artifact.config_dir)?;
    let params = args.sampling.params(&artifact.config)?;
    let seed = args.sampling.seed();
    let prompt_ids = tokenizer.encode(&args.prompt, true)?;
    if prompt_ids.is_empty() {
        user_bail!("--prompt is empty: give some text to continue");
    }
    check_fits(&artifact, prompt_ids.len())?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens.unwrap_or(artifact.config.max_gen_len),
        stop_tokens: stop_tokens(&artifact, &tokenizer),
        stop_strings: Vec::new(),
        vocab_size: artifact.vocab_size(),
    };
    let mut sampler = Sampler::new(params, seed);
    let json = args.json;
    let g = with_session(&artifact, device, args.adapter.as_deref(), |session| {
        let mut out = std::io::stdout().lock();
        generate(
            session,
            &tokenizer,
            &[],
            &prompt_ids,
            &mut sampler,
            &opts,
            &mut |piece| {
                if !json {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                }
                Ok(())
            },
        )
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": g.generated_ids,
            "text": g.text,
            "stop_reason": g.stop_reason.as_str(),
            "seed": seed,
            "timings": {
                "prefill_s": g.prefill_s,
                "decode_s": g.decode_s,
                "prefill_tok_s": g.prefill_tok_s(),
                "decode_tok_s": g.decode_tok_s(),
            },
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?).context("writing to stdout")?;
    } else {
        writeln!(out).context("writing to stdout")?;
        eprintln!(
            "[{} prompt tokens, {} generated ({}); prefill {:.1} tok/s, decode {:.1} tok/s]",
            prompt_ids.len(),
            g.generated_ids.len(),
            g.stop_reason.as_str(),
            g.prefill_tok_s(),
            g.decode_tok_s()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use crate::runtime::artifact::tests::{write_tiny_artifact, write_tiny_tokenizer};

    fn args(dir: &std::path::Path, prompt: &str) -> RunArgs {
        RunArgs {
            dist_dir: dir.to_path_buf(),
            prompt: prompt.into(),
            max_tokens: Some(3),
            sampling: SamplingArgs {
                greedy: true,
                ..Default::default()
            },
            json: true,
            device: None,
            adapter: None,
            threads: ThreadsArg::default(),
        }
    }

    #[test]
    fn runs_the_synthetic_artifact_end_to_end() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        write_tiny_tokenizer(tmp.path());
        execute(args(tmp.path(), "abc")).unwrap();
    }

    #[test]
    fn bad_inputs_are_user_errors() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        write_tiny_tokenizer(tmp.path());
        // 9 tokens do not fit the context of 8 (max_window_size).
        let e = execute(args(tmp.path(), "abcdeabcd")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User, "{e}");
        let mut a = args(tmp.path(), "abc");
        a.sampling.top_p = Some(1.5);
        assert_eq!(class_of(&execute(a).unwrap_err()), ErrorClass::User);
        let mut a = args(tmp.path(), "abc");
        a.device = Some("cuda".into());
        assert_eq!(class_of(&execute(a).unwrap_err()), ErrorClass::User);
        let e = execute(args(&tmp.path().join("nope"), "abc")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
    }
}
