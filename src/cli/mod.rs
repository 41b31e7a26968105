pub mod bench;
pub mod chat;
pub mod logits;
pub mod run;
