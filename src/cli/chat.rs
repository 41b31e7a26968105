//! `mlcb chat DIST_DIR`: an interactive multi-turn chat under the artifact's conversation template.
//!
//! Reads one user message per line until EOF (so it also works with piped input) and prints the
//! reply after each. Commands: `/reset` (forget the conversation), `/stats` (speed of the last
//! reply), `/exit`. The KV cache is reused between turns: only the tokens after the longest
//! common prefix of the new prompt and what the session already holds are prefilled.

use crate::cli::run::{stop_tokens, SamplingArgs};
use crate::cli::threads::ThreadsArg;
use crate::error::{class_of, ErrorClass};
use crate::runtime::artifact::Artifact;
use crate::runtime::backend::{resolve_device, with_session};
use crate::runtime::conversation::{ChatTemplate, Conversation, Message, Role};
use crate::runtime::generate::{generate, GenerateOptions, Generation};
use crate::runtime::sampling::Sampler;
use crate::runtime::tokenizer::TextTokenizer;
use crate::runtime::Session;
use anyhow::{Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// The artifact folder `mlcb build` wrote (dist/<model>-<quant>).
    pub dist_dir: PathBuf,
    /// Most tokens per reply (default: max_gen_len of the chat config).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Replace the template's system prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
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

pub fn execute(args: ChatArgs) -> Result<()> {
    args.threads.clone().install(|_| chat_on_pool(args))
}

fn chat_on_pool(args: ChatArgs) -> Result<()> {
    let artifact = Artifact::open_for(&args.dist_dir, args.device.as_deref())?;
    let device = resolve_device(&artifact, args.device.as_deref())?;
    let tokenizer = TextTokenizer::from_dir(&artifact.config_dir)?;
    let template = ChatTemplate::select(&artifact.config.conv_template, &tokenizer.config)?;
    let mut conv = Conversation::new(template);
    if let Some(system) = &args.system {
        conv.messages
            .push(Message::new(Role::System, system.as_str()));
    }
    let mut sampler = Sampler::new(
        args.sampling.params(&artifact.config)?,
        args.sampling.seed(),
    );
    let opts = GenerateOptions {
        max_tokens: args.max_tokens.unwrap_or(artifact.config.max_gen_len),
        stop_tokens: stop_tokens(&artifact, &tokenizer),
        stop_strings: conv.template.stop_strings.clone(),
        vocab_size: artifact.vocab_size(),
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "mlcb chat: {} ({} template). /reset, /stats, /exit",
            artifact.config.local_id, conv.template.name
        );
    }
    let context = artifact.context_len();
    with_session(&artifact, device, args.adapter.as_deref(), |session| {
        let mut chat = Chat {
            session,
            tokenizer: &tokenizer,
            conv,
            sampler: &mut sampler,
            opts: &opts,
            context,
            held: Vec::new(),
            last: None,
        };
        chat.run(std::io::stdin().lock(), &mut std::io::stdout(), interactive)
    })
}

/// The chat state: the session, what it holds, and the conversation.
pub struct Chat<'s, 't> {
    pub session: &'s mut dyn Session,
    pub tokenizer: &'t TextTokenizer,
    pub conv: Conversation,
    pub sampler: &'t mut Sampler,
    pub opts: &'t GenerateOptions,
    /// Usable context in tokens.
    pub context: usize,
    /// The ids the session has processed, in order.
    pub held: Vec<u32>,
    pub last: Option<Generation>,
}

impl Chat<'_, '_> {
    /// Reads lines from `input` until EOF or `/exit`, writing replies to `out`.
    pub fn run(
        &mut self,
        input: impl BufRead,
        out: &mut dyn Write,
        interactive: bool,
    ) -> Result<()> {
        let prompt = |out: &mut dyn Write| -> Result<()> {
            if interactive {
                write!(out, "> ")?;
                out.flush()?;
            }
            Ok(())
        };
        prompt(out)?;
        for line in input.lines() {
            let line = line.context("reading standard input")?;
            let line = line.trim();
            match line {
                "" => {}
                "/exit" | "/quit" => break,
                "/reset" => {
                    self.conv.reset();
                    self.session.reset();
                    self.held.clear();
                    writeln!(out, "[conversation reset]")?;
                }
                "/stats" => writeln!(out, "{}", self.stats())?,
                _ => match self.turn(line, out) {
                    Ok(()) => {}
                    Err(e) if class_of(&e) == ErrorClass::User => {
                        writeln!(out, "[error: {e:#}]")?;
                    }
                    Err(e) => return Err(e),
                },
            }
            prompt(out)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> String {
        match &self.last {
            Some(g) => format!(
                "[last reply: prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s; context {}/{}]",
                g.prefill_tokens,
                g.prefill_tok_s(),
                g.decode_steps,
                g.decode_tok_s(),
                self.session.position(),
                self.context
            ),
            None => "[no reply yet]".to_string(),
        }
    }

    /// One user message → one streamed reply.
    pub fn turn(&mut self, text: &str, out: &mut dyn Write) -> Result<()> {
        self.conv.push_user(text);
        let ids = match self.fit_prompt() {
            Ok(ids) => ids,
            Err(e) => {
                self.conv.messages.pop();
                return Err(e);
            }
        };
        // Reuse the KV cache when the session's tokens are a prefix of the new prompt.
        let common = if ids.len() > self.held.len() && ids.starts_with(&self.held) {
            self.held.len()
        } else {
            self.session.reset();
            self.held.clear();
            0
        };
        let g = generate(
            self.session,
            self.tokenizer,
            &ids[..common],
            &ids[common..],
            self.sampler,
            self.opts,
            &mut |piece| {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
                Ok(())
            },
        );
        let g = match g {
            Ok(g) => g,
            Err(e) => {
                // The session state is unknown after a failed call: start afresh next turn.
                self.conv.messages.pop();
                self.session.reset();
                self.held.clear();
                return Err(e);
            }
        };
        writeln!(out)?;
        self.held = ids;
        self.held
            .extend_from_slice(&g.generated_ids[..g.decode_steps]);
        self.conv.push_assistant(g.text.trim());
        self.last = Some(g);
        Ok(())
    }

    /// Token ids of the next prompt, dropping the oldest turns until it leaves room to reply.
    fn fit_prompt(&mut self) -> Result<Vec<u32>> {
        loop {
            let text = self.conv.prompt()?;
            let ids = self
                .tokenizer
                .encode(&text, self.conv.template.add_special_tokens())?;
            if ids.len() < self.context {
                return Ok(ids);
            }
            if !self.conv.drop_oldest_turn() {
                crate::user_bail!(
                    "the message needs {} tokens with the template, the context holds {}; send a shorter one",
                    ids.len(),
                    self.context
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::generate::tests::ScriptSession;
    use crate::runtime::sampling::SamplingParams;
    use std::path::Path;

    fn tok() -> TextTokenizer {
        TextTokenizer::from_dir(Path::new("tests/fixtures/tiny-llama")).unwrap()
    }

    #[test]
    fn piped_chat_replies_per_line_and_reuses_the_cache() {
        let t = tok();
        let reply1 = t.encode(" Hi there", false).unwrap();
        let reply2 = t.encode(" Fine", false).unwrap();
        // Script: prefill → reply1 tokens (one per call), then <bot> stop string starts … we use
        // the stop token 0 to end each reply.
        let mut script = reply1.clone();
        script.push(0);
        script.extend(&reply2);
        script.push(0);
        let mut session = ScriptSession::new(script, 512, 256);
        let mut sampler = Sampler::new(SamplingParams::greedy(), 1);
        let opts = GenerateOptions {
            max_tokens: 20,
            stop_tokens: vec![0],
            stop_strings: vec!["<human>".into()],
            vocab_size: 512,
        };
        let conv = Conversation::new(ChatTemplate::builtin("redpajama_chat").unwrap());
        let mut chat = Chat {
            session: &mut session,
            tokenizer: &t,
            conv,
            sampler: &mut sampler,
            opts: &opts,
            context: 256,
            held: Vec::new(),
            last: None,
        };
        let mut out = Vec::new();
        chat.run(
            &b"Hello\n\n/stats\nHow are you?\n/exit\nignored\n"[..],
            &mut out,
            false,
        )
        .unwrap();
        let first_prompt = t.encode("<human>: Hello\n<bot>:", true).unwrap();
        let second_prompt = t
            .encode(
                "<human>: Hello\n<bot>: Hi there\n<human>: How are you?\n<bot>:",
                true,
            )
            .unwrap();
        let held = chat.held.clone();
        let stats = chat.stats();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], " Hi there");
        assert!(lines[1].starts_with("[last reply: prefill"), "{out}");
        assert_eq!(lines[2], " Fine");
        assert_eq!(lines.len(), 3, "{out}");
        assert!(stats.contains("decode"));

        assert_eq!(session.calls[0], first_prompt);
        // Second turn: only the part after what the session holds is prefilled.
        let second_call = &session.calls[1 + reply1.len()];
        let held_before: Vec<u32> = first_prompt.iter().chain(&reply1).copied().collect();
        assert!(second_prompt.starts_with(&held_before));
        assert_eq!(second_call[..], second_prompt[held_before.len()..]);
        assert_eq!(session.pos, held.len());
    }

    #[test]
    fn too_long_message_is_reported_and_the_chat_goes_on() {
        let t = tok();
        let mut session = ScriptSession::new(vec![0, 0, 0], 512, 16);
        let mut sampler = Sampler::new(SamplingParams::greedy(), 1);
        let opts = GenerateOptions {
            max_tokens: 4,
            stop_tokens: vec![0],
            stop_strings: vec![],
            vocab_size: 512,
        };
        let mut chat = Chat {
            session: &mut session,
            tokenizer: &t,
            conv: Conversation::new(ChatTemplate::builtin("LM").unwrap()),
            sampler: &mut sampler,
            opts: &opts,
            context: 16,
            held: Vec::new(),
            last: None,
        };
        let long = "word ".repeat(40);
        let mut out = Vec::new();
        chat.run(format!("{long}\nhi\n").as_bytes(), &mut out, false)
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("[error: the message needs"), "{out}");
        assert_eq!(chat.conv.messages.len(), 2, "only hi and its reply remain");
    }
}
