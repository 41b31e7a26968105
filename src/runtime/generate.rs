//! The generation loop: prefill the prompt in one call, then decode token by token, streaming text
//! as it becomes complete, until a stop token, a stop string, the token limit or a full context.

use crate::runtime::sampling::Sampler;
use crate::runtime::tokenizer::TextTokenizer;
use crate::runtime::Session;
use crate::user_bail;
use anyhow::Result;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// At most this many tokens are generated (a stop token counts).
    pub max_tokens: usize,
    pub stop_tokens: Vec<u32>,
    /// Text that ends the reply; it is cut off and never printed.
    pub stop_strings: Vec<String>,
    /// Ids must be below this (the plan's vocabulary size).
    pub vocab_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken,
    StopString,
    MaxTokens,
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::StopToken => "stop_token",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Every sampled id, including a final stop token.
    pub generated_ids: Vec<u32>,
    /// The reply text, without a stop token or stop string.
    pub text: String,
    pub stop_reason: StopReason,
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    /// Decode forward calls (one token each) and their total time.
    pub decode_steps: usize,
    pub decode_s: f64,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_s)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_s)
    }
}

pub fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// Checks ids against the vocabulary and the room left in the session.
pub fn check_prompt(session: &dyn Session, ids: &[u32], vocab_size: usize) -> Result<()> {
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab_size)
    {
        user_bail!("token id {id} (position {i}) is not below the vocabulary size {vocab_size}");
    }
    let (pos, cap) = (session.position(), session.max_seq_len());
    if pos + ids.len() > cap {
        user_bail!(
            "the prompt has {} tokens but the context holds {cap}{}; shorten it",
            ids.len(),
            if pos > 0 {
                format!(" and {pos} are already used")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Runs one reply. `prefill` are the new ids to process (the session already holds `context`,
/// which the repetition penalty also sees). `on_text` receives the text as it becomes final.
pub fn generate(
    session: &mut dyn Session,
    tokenizer: &TextTokenizer,
    context: &[u32],
    prefill: &[u32],
    sampler: &mut Sampler,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    if prefill.is_empty() {
        user_bail!("the prompt is empty: nothing to generate from");
    }
    check_prompt(session, prefill, opts.vocab_size)?;
    let start = Instant::now();
    let mut logits = session.forward(prefill, false)?;
    let prefill_s = start.elapsed().as_secs_f64();
    check_logits(&logits, opts.vocab_size)?;

    let mut seen: Vec<u32> = context.iter().chain(prefill).copied().collect();
    let mut gen = Generation {
        generated_ids: Vec::new(),
        text: String::new(),
        stop_reason: StopReason::MaxTokens,
        prefill_tokens: prefill.len(),
        prefill_s,
        decode_steps: 0,
        decode_s: 0.0,
    };
    let mut stream = tokenizer.stream();
    let mut emitted = 0usize;
    if opts.max_tokens == 0 {
        return Ok(gen);
    }
    loop {
        let id = sampler.sample(&mut logits, &seen);
        gen.generated_ids.push(id);
        seen.push(id);
        if opts.stop_tokens.contains(&id) {
            gen.stop_reason = StopReason::StopToken;
            break;
        }
        gen.text.push_str(&stream.push(id)?);
        if emit(
            &mut gen.text,
            &mut emitted,
            &opts.stop_strings,
            false,
            on_text,
        )? {
            gen.stop_reason = StopReason::StopString;
            return Ok(gen);
        }
        if gen.generated_ids.len() >= opts.max_tokens {
            gen.stop_reason = StopReason::MaxTokens;
            break;
        }
        if session.position() >= session.max_seq_len() {
            gen.stop_reason = StopReason::ContextFull;
            break;
        }
        let t = Instant::now();
        logits = session.forward(&[id], false)?;
        gen.decode_s += t.elapsed().as_secs_f64();
        gen.decode_steps += 1;
        check_logits(&logits, opts.vocab_size)?;
    }
    gen.text.push_str(&stream.flush()?);
    if emit(
        &mut gen.text,
        &mut emitted,
        &opts.stop_strings,
        true,
        on_text,
    )? {
        gen.stop_reason = StopReason::StopString;
    }
    Ok(gen)
}

fn check_logits(logits: &[f32], vocab: usize) -> Result<()> {
    if logits.len() != vocab {
        anyhow::bail!(
            "the backend returned {} logits, expected one row of {vocab}",
            logits.len()
        );
    }
    Ok(())
}

/// Hands `text[emitted..]` to `on_text`, except a tail that might still grow into a stop string
/// (unless `final_`). If a stop string is present, cuts the text there and returns true.
fn emit(
    text: &mut String,
    emitted: &mut usize,
    stop_strings: &[String],
    final_: bool,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<bool> {
    let hit = stop_strings
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min();
    if let Some(at) = hit {
        text.truncate(at);
    }
    let end = if hit.is_some() || final_ {
        text.len()
    } else {
        text.len() - held_back(text, stop_strings)
    };
    if end > *emitted {
        on_text(&text[*emitted..end])?;
        *emitted = end;
    }
    Ok(hit.is_some())
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn held_back(text: &str, stop_strings: &[String]) -> usize {
    let mut best = 0;
    for s in stop_strings {
        for k in (1..s.len()).rev() {
            if k <= best {
                break;
            }
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                best = k;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runtime::sampling::SamplingParams;
    use std::path::Path;

    /// A session that "predicts" a fixed script of tokens, one per call, and records its inputs.
    pub struct ScriptSession {
        pub script: Vec<u32>,
        pub vocab: usize,
        pub cap: usize,
        pub pos: usize,
        pub calls: Vec<Vec<u32>>,
    }

    impl ScriptSession {
        pub fn new(script: Vec<u32>, vocab: usize, cap: usize) -> Self {
            ScriptSession {
                script,
                vocab,
                cap,
                pos: 0,
                calls: Vec::new(),
            }
        }
    }

    impl Session for ScriptSession {
        fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
            assert!(
                self.pos + tokens.len() <= self.cap,
                "overflowed the context"
            );
            self.pos += tokens.len();
            let rows = if all_logits { tokens.len() } else { 1 };
            let next = self.script.get(self.calls.len()).copied().unwrap_or(1);
            self.calls.push(tokens.to_vec());
            let mut out = vec![0f32; rows * self.vocab];
            out[(rows - 1) * self.vocab + next as usize] = 10.0;
            Ok(out)
        }
        fn reset(&mut self) {
            self.pos = 0;
            self.calls.clear();
        }
        fn position(&self) -> usize {
            self.pos
        }
        fn max_seq_len(&self) -> usize {
            self.cap
        }
    }

    fn tok() -> TextTokenizer {
        TextTokenizer::from_dir(Path::new("tests/fixtures/tiny-llama")).unwrap()
    }

    fn opts(max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            stop_tokens: vec![0],
            stop_strings: vec![],
            vocab_size: 512,
        }
    }

    fn run(
        session: &mut ScriptSession,
        prompt: &[u32],
        o: &GenerateOptions,
    ) -> (Generation, Vec<String>) {
        let t = tok();
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0);
        let mut pieces = Vec::new();
        let g = generate(session, &t, &[], prompt, &mut sampler, o, &mut |p| {
            pieces.push(p.to_string());
            Ok(())
        })
        .unwrap();
        (g, pieces)
    }

    #[test]
    fn prefill_once_then_one_token_per_call_until_stop_token() {
        let t = tok();
        let reply = t.encode("Hello world", false).unwrap();
        let mut script = reply.clone();
        script.push(0);
        let mut s = ScriptSession::new(script, 512, 64);
        let (g, pieces) = run(&mut s, &[5, 6, 7], &opts(100));
        assert_eq!(g.stop_reason, StopReason::StopToken);
        assert_eq!(g.text, "Hello world");
        assert_eq!(pieces.concat(), "Hello world");
        assert_eq!(g.generated_ids[..reply.len()], reply[..]);
        assert_eq!(*g.generated_ids.last().unwrap(), 0);
        assert_eq!(s.calls[0], vec![5, 6, 7]);
        // Every generated token but the stop token is fed back, one per call.
        for (call, id) in s.calls[1..].iter().zip(&reply) {
            assert_eq!(call, &vec![*id]);
        }
        assert_eq!(s.calls.len(), reply.len() + 1);
        assert_eq!(g.decode_steps, reply.len());
    }

    #[test]
    fn stops_at_max_tokens_and_context_full() {
        let mut s = ScriptSession::new(vec![40; 50], 512, 64);
        let (g, _) = run(&mut s, &[1, 2], &opts(5));
        assert_eq!(g.stop_reason, StopReason::MaxTokens);
        assert_eq!(g.generated_ids.len(), 5);
        assert_eq!(s.pos, 2 + 4);

        let mut s = ScriptSession::new(vec![40; 50], 512, 6);
        let (g, _) = run(&mut s, &[1, 2], &opts(100));
        assert_eq!(g.stop_reason, StopReason::ContextFull);
        assert_eq!(s.pos, 6);
        assert_eq!(g.generated_ids.len(), 5);
    }

    #[test]
    fn stop_string_is_cut_and_never_printed() {
        let t = tok();
        let script = t.encode("Sure: yes#", false).unwrap();
        let mut script2 = script.clone();
        script2.extend(t.encode("## more text", false).unwrap());
        let mut s = ScriptSession::new(script2, 512, 64);
        let mut o = opts(100);
        o.stop_strings = vec!["###".into()];
        let (g, pieces) = run(&mut s, &[1], &o);
        assert_eq!(g.stop_reason, StopReason::StopString);
        assert_eq!(g.text, "Sure: yes");
        assert_eq!(pieces.concat(), "Sure: yes");
        assert!(pieces.iter().all(|p| !p.contains('#')));
    }

    #[test]
    fn held_back_tail_is_released_when_it_is_not_a_stop() {
        let t = tok();
        let script = t.encode("a#b", false).unwrap();
        let mut s = ScriptSession::new(script.clone(), 512, 64);
        let mut o = opts(script.len());
        o.stop_strings = vec!["##".into()];
        let (g, pieces) = run(&mut s, &[1], &o);
        assert_eq!(g.stop_reason, StopReason::MaxTokens);
        assert_eq!(pieces.concat(), "a#b");
    }

    #[test]
    fn bad_prompts_are_user_errors() {
        let t = tok();
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0);
        let o = opts(4);
        let mut sink = |_: &str| Ok(());
        let cases: [(&[u32], usize); 3] = [(&[1, 512], 64), (&[1; 9], 8), (&[], 8)];
        for (prompt, cap) in cases {
            let mut s = ScriptSession::new(vec![], 512, cap);
            let err = generate(&mut s, &t, &[], prompt, &mut sampler, &o, &mut sink).unwrap_err();
            assert_eq!(
                crate::error::class_of(&err),
                crate::error::ErrorClass::User,
                "{err}"
            );
            assert!(s.calls.is_empty());
        }
    }
}
