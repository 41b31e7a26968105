//! Conversation templates: how a list of chat messages becomes the prompt text.
//!
//! Built-in templates follow MLC's 2023 `conv_templates` (vicuna_v1.1, redpajama_chat, rwkv,
//! llama-2, chatml, LM). When the config names no built-in template and the tokenizer config has a
//! Hugging Face `chat_template`, that Jinja template is rendered with minijinja the way
//! transformers' `apply_chat_template` does (trim_blocks, lstrip_blocks, `raise_exception`,
//! Python string methods).

use crate::runtime::tokenizer::TokenizerConfig;
use anyhow::Result;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// MLC's "role: message" family: `system + seps[0]`, then each message as
/// `role + role_msg_sep + content + seps[i % len]`, then `assistant_role + role_empty_sep`.
#[derive(Debug, Clone, PartialEq)]
struct RoleMsgStyle {
    roles: [&'static str; 2],
    seps: &'static [&'static str],
    role_msg_sep: &'static str,
    role_empty_sep: &'static str,
    /// Messages every conversation starts with (RWKV's example dialogue).
    prelude: &'static [(Role, &'static str)],
}

#[derive(Debug, Clone, PartialEq)]
enum Style {
    RoleMsg(RoleMsgStyle),
    Llama2,
    ChatMl,
    /// Plain language model: the message texts concatenated, nothing added.
    Lm,
    Jinja {
        source: String,
        bos_token: String,
        eos_token: String,
    },
}

/// A template: how to render messages, the default system prompt, and the strings that end a
/// reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub name: String,
    pub system: String,
    pub stop_strings: Vec<String>,
    style: Style,
}

const VICUNA_SYSTEM: &str =
    "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

const RWKV_SYSTEM: &str = "\nThe following is a coherent verbose detailed conversation between a girl \
named Alice and her friend Bob. Alice is very intelligent, creative and friendly. Alice is unlikely to \
disagree with Bob, and Alice doesn't like to ask Bob questions. Alice likes to tell Bob a lot about \
herself and her opinions. Alice usually gives Bob kind, helpful and informative advices.";

const RWKV_PRELUDE: &[(Role, &str)] = &[
    (Role::User, "Hello Alice, how are you doing?"),
    (Role::Assistant, "Hi! Thanks, I'm fine. What about you?"),
    (
        Role::User,
        "I am fine. It's nice to see you. Look, here is a store selling tea and juice.",
    ),
    (
        Role::Assistant,
        "Sure. Let's go inside. I would like to have some Mocha latte, which is my favourite!",
    ),
];

const LLAMA2_SYSTEM: &str = "You are a helpful, respectful and honest assistant.";

/// Names of the built-in templates.
pub const BUILTIN_TEMPLATES: &[&str] = &[
    "vicuna_v1.1",
    "redpajama_chat",
    "rwkv",
    "llama-2",
    "chatml",
    "LM",
];

impl ChatTemplate {
    /// A built-in template by its MLC name (a few spelling variants accepted).
    pub fn builtin(name: &str) -> Option<ChatTemplate> {
        let t = |name: &str, system: &str, stops: &[&str], style| ChatTemplate {
            name: name.into(),
            system: system.into(),
            stop_strings: stops.iter().map(|s| s.to_string()).collect(),
            style,
        };
        Some(match name {
            "vicuna_v1.1" | "vicuna-v1.1" | "vicuna" => t(
                "vicuna_v1.1",
                VICUNA_SYSTEM,
                &["</s>"],
                Style::RoleMsg(RoleMsgStyle {
                    roles: ["USER", "ASSISTANT"],
                    seps: &[" ", "</s>"],
                    role_msg_sep: ": ",
                    role_empty_sep: ":",
                    prelude: &[],
                }),
            ),
            "redpajama_chat" | "redpajama-chat" => t(
                "redpajama_chat",
                "",
                &["<human>"],
                Style::RoleMsg(RoleMsgStyle {
                    roles: ["<human>", "<bot>"],
                    seps: &["\n"],
                    role_msg_sep: ": ",
                    role_empty_sep: ":",
                    prelude: &[],
                }),
            ),
            "rwkv" => t(
                "rwkv",
                RWKV_SYSTEM,
                &["\n\n"],
                Style::RoleMsg(RoleMsgStyle {
                    roles: ["Bob", "Alice"],
                    seps: &["\n\n"],
                    role_msg_sep: ": ",
                    role_empty_sep: ":",
                    prelude: RWKV_PRELUDE,
                }),
            ),
            "llama-2" | "llama_2" | "llama2" => {
                t("llama-2", LLAMA2_SYSTEM, &["[INST]"], Style::Llama2)
            }
            "chatml" => t(
                "chatml",
                "You are a helpful assistant.",
                &["<|im_end|>"],
                Style::ChatMl,
            ),
            "LM" | "lm" => t("LM", "", &[], Style::Lm),
            _ => return None,
        })
    }

    /// A Hugging Face Jinja chat template. Its syntax is checked now.
    pub fn jinja(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let env = jinja_env();
        env.template_from_str(source).map_err(|e| {
            crate::error::user(format!(
                "the chat_template in tokenizer_config.json does not parse: {e}"
            ))
        })?;
        let stop_strings = if eos_token.is_empty() {
            vec![]
        } else {
            vec![eos_token.to_string()]
        };
        Ok(ChatTemplate {
            name: "hf-chat-template".into(),
            system: String::new(),
            stop_strings,
            style: Style::Jinja {
                source: source.to_string(),
                bos_token: bos_token.to_string(),
                eos_token: eos_token.to_string(),
            },
        })
    }

    /// The template for an artifact: the config's `conv_template` when it is a built-in name, else
    /// the tokenizer's Jinja chat template when there is one, else plain `LM`.
    pub fn select(conv_template: &str, tokenizer: &TokenizerConfig) -> Result<ChatTemplate> {
        if let Some(t) = Self::builtin(conv_template) {
            return Ok(t);
        }
        if let Some(src) = &tokenizer.chat_template {
            return Self::jinja(
                src,
                tokenizer.bos_token.as_deref().unwrap_or(""),
                tokenizer.eos_token.as_deref().unwrap_or(""),
            );
        }
        Ok(Self::builtin("LM").expect("LM is built in"))
    }

    /// Whether the rendered text should be tokenized with the tokenizer's special tokens (BOS)
    /// added. Jinja templates write BOS into the text themselves, as in transformers.
    pub fn add_special_tokens(&self) -> bool {
        !matches!(self.style, Style::Jinja { .. })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the assistant's reply
    /// starts. A leading system message replaces the template's default system prompt.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let (system, rest) = match messages.first() {
            Some(m) if m.role == Role::System => (m.content.as_str(), &messages[1..]),
            _ => (self.system.as_str(), messages),
        };
        Ok(match &self.style {
            Style::RoleMsg(s) => render_role_msg(s, system, rest, add_generation_prompt),
            Style::Llama2 => render_llama2(system, rest),
            Style::ChatMl => render_chatml(system, rest, add_generation_prompt),
            Style::Lm => rest.iter().map(|m| m.content.as_str()).collect(),
            Style::Jinja {
                source,
                bos_token,
                eos_token,
            } => render_jinja(
                source,
                bos_token,
                eos_token,
                messages,
                add_generation_prompt,
            )?,
        })
    }
}

fn render_role_msg(s: &RoleMsgStyle, system: &str, messages: &[Message], gen: bool) -> String {
    let mut out = String::new();
    if !system.is_empty() {
        out.push_str(system);
        out.push_str(s.seps[0]);
    }
    let prelude = s.prelude.iter().map(|&(role, c)| (role, c));
    let all = prelude.chain(messages.iter().map(|m| (m.role, m.content.as_str())));
    for (i, (role, content)) in all.enumerate() {
        let name = if role == Role::Assistant {
            s.roles[1]
        } else {
            s.roles[0]
        };
        out.push_str(name);
        out.push_str(s.role_msg_sep);
        out.push_str(content);
        out.push_str(s.seps[i % s.seps.len()]);
    }
    if gen {
        out.push_str(s.roles[1]);
        out.push_str(s.role_empty_sep);
    }
    out
}

/// Meta's Llama-2 chat format; BOS of the first turn comes from the tokenizer, later ones are text.
fn render_llama2(system: &str, messages: &[Message]) -> String {
    let mut out = String::new();
    let mut first = true;
    for m in messages {
        match m.role {
            Role::Assistant => {
                out.push(' ');
                out.push_str(m.content.trim());
                out.push_str(" </s><s>");
            }
            _ => {
                out.push_str("[INST] ");
                if first && !system.is_empty() {
                    out.push_str("<<SYS>>\n");
                    out.push_str(system);
                    out.push_str("\n<</SYS>>\n\n");
                }
                first = false;
                out.push_str(m.content.trim());
                out.push_str(" [/INST]");
            }
        }
    }
    out
}

fn render_chatml(system: &str, messages: &[Message], gen: bool) -> String {
    let mut out = String::new();
    let mut block = |role: &str, content: &str| {
        out.push_str("<|im_start|>");
        out.push_str(role);
        out.push('\n');
        out.push_str(content);
        out.push_str("<|im_end|>\n");
    };
    if !system.is_empty() {
        block("system", system);
    }
    for m in messages {
        block(m.role.as_str(), &m.content);
    }
    if gen {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// The Jinja environment transformers uses: trim and lstrip blocks, Python string methods,
/// `raise_exception`.
fn jinja_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env
}

fn render_jinja(
    source: &str,
    bos_token: &str,
    eos_token: &str,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String> {
    let env = jinja_env();
    let msgs: Vec<BTreeMap<&str, minijinja::Value>> = messages
        .iter()
        .map(|m| {
            BTreeMap::from([
                ("role", minijinja::Value::from(m.role.as_str())),
                ("content", minijinja::Value::from(m.content.as_str())),
            ])
        })
        .collect();
    let ctx = minijinja::context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    env.render_str(source, ctx).map_err(|e| {
        let detail = match e.kind() {
            minijinja::ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
            _ => e.to_string(),
        };
        crate::error::user(format!(
            "the chat_template in tokenizer_config.json failed: {detail}"
        ))
    })
}

/// A multi-turn conversation under one template.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub template: ChatTemplate,
    pub messages: Vec<Message>,
}

impl Conversation {
    pub fn new(template: ChatTemplate) -> Conversation {
        Conversation {
            template,
            messages: Vec::new(),
        }
    }

    pub fn push_user(&mut self, text: &str) {
        self.messages.push(Message::new(Role::User, text));
    }

    pub fn push_assistant(&mut self, text: &str) {
        self.messages.push(Message::new(Role::Assistant, text));
    }

    /// Forgets every message (a leading system message is kept).
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == Role::System);
    }

    /// The prompt for the assistant's next reply.
    pub fn prompt(&self) -> Result<String> {
        self.template.render(&self.messages, true)
    }

    /// Drops the oldest user turn and the replies that follow it, keeping a system message and the
    /// last user message. Returns false when nothing is left to drop.
    pub fn drop_oldest_turn(&mut self) -> bool {
        let start = usize::from(self.messages.first().map(|m| m.role) == Some(Role::System));
        let users: Vec<usize> = (start..self.messages.len())
            .filter(|&i| self.messages[i].role == Role::User)
            .collect();
        if users.len() < 2 {
            return false;
        }
        self.messages.drain(start..users[1]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(t: &ChatTemplate) -> String {
        let msgs = [
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "How are you?"),
        ];
        t.render(&msgs, true).unwrap()
    }

    fn builtin(name: &str) -> ChatTemplate {
        ChatTemplate::builtin(name).unwrap()
    }

    #[test]
    fn vicuna_multi_turn() {
        assert_eq!(
            turns(&builtin("vicuna_v1.1")),
            format!("{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:")
        );
    }

    #[test]
    fn redpajama_multi_turn() {
        assert_eq!(
            turns(&builtin("redpajama_chat")),
            "<human>: Hi\n<bot>: Hello!\n<human>: How are you?\n<bot>:"
        );
    }

    #[test]
    fn rwkv_has_its_prelude() {
        let p = builtin("rwkv")
            .render(&[Message::new(Role::User, "Hi")], true)
            .unwrap();
        assert!(p.starts_with(&format!(
            "{RWKV_SYSTEM}\n\nBob: Hello Alice, how are you doing?\n\nAlice: Hi!"
        )));
        assert!(p.ends_with("favourite!\n\nBob: Hi\n\nAlice:"), "{p:?}");
    }

    #[test]
    fn llama2_multi_turn() {
        assert_eq!(
            turns(&builtin("llama-2")),
            format!(
                "[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] How are you? [/INST]"
            )
        );
    }

    #[test]
    fn chatml_with_custom_system() {
        let msgs = [
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
        ];
        assert_eq!(
            builtin("chatml").render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn lm_is_plain_text() {
        assert_eq!(turns(&builtin("LM")), "HiHello!How are you?");
        assert!(builtin("LM").add_special_tokens());
    }

    const MISTRAL_LIKE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}\
{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}\
{{ ' ' + message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}\
{% endif %}{% endfor %}";

    #[test]
    fn jinja_template_renders_like_transformers() {
        let t = ChatTemplate::jinja(MISTRAL_LIKE, "<s>", "</s>").unwrap();
        let msgs = [
            Message::new(Role::User, "  Hi "),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "How are you?"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<s>[INST] Hi [/INST] Hello!</s>[INST] How are you? [/INST]"
        );
        assert!(!t.add_special_tokens());
        assert_eq!(t.stop_strings, vec!["</s>".to_string()]);
    }

    #[test]
    fn jinja_raise_exception_is_a_user_error() {
        let t = ChatTemplate::jinja(MISTRAL_LIKE, "<s>", "</s>").unwrap();
        let err = t
            .render(&[Message::new(Role::System, "x")], true)
            .unwrap_err();
        assert_eq!(crate::error::class_of(&err), crate::error::ErrorClass::User);
        assert!(
            err.to_string().contains("Only user and assistant roles"),
            "{err}"
        );
    }

    #[test]
    fn jinja_trims_and_lstrips_blocks() {
        let src = "{% for message in messages %}\n<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}\n  {% if add_generation_prompt %}\n<|assistant|>\n{% endif %}";
        let t = ChatTemplate::jinja(src, "", "</s>").unwrap();
        let msgs = [Message::new(Role::User, "hi")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|user|>\nhi</s>\n<|assistant|>\n"
        );
        assert_eq!(t.render(&msgs, false).unwrap(), "<|user|>\nhi</s>\n");
    }

    #[test]
    fn bad_jinja_is_a_user_error() {
        let err = ChatTemplate::jinja("{% for x in %}", "", "").unwrap_err();
        assert_eq!(crate::error::class_of(&err), crate::error::ErrorClass::User);
    }

    #[test]
    fn selection_prefers_builtin_then_jinja_then_lm() {
        let mut cfg = TokenizerConfig::default();
        assert_eq!(
            ChatTemplate::select("vicuna_v1.1", &cfg).unwrap().name,
            "vicuna_v1.1"
        );
        assert_eq!(
            ChatTemplate::select("llama_default", &cfg).unwrap().name,
            "LM"
        );
        cfg.chat_template = Some(MISTRAL_LIKE.into());
        assert_eq!(
            ChatTemplate::select("llama_default", &cfg).unwrap().name,
            "hf-chat-template"
        );
        assert_eq!(ChatTemplate::select("chatml", &cfg).unwrap().name, "chatml");
    }

    #[test]
    fn conversation_drops_oldest_turns() {
        let mut c = Conversation::new(builtin("redpajama_chat"));
        c.messages.push(Message::new(Role::System, "S"));
        c.push_user("a");
        c.push_assistant("b");
        c.push_user("c");
        assert!(c.drop_oldest_turn());
        assert_eq!(c.prompt().unwrap(), "S\n<human>: c\n<bot>:");
        assert!(!c.drop_oldest_turn());
        c.reset();
        assert_eq!(c.messages, vec![Message::new(Role::System, "S")]);
    }
}
