#![no_main]
//! cargo fuzz run gguf — see mlcb_fuzz::gguf for what the input is.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlcb_fuzz::gguf(data);
});
