#![no_main]
//! cargo fuzz run safetensors_header — see mlcb_fuzz::safetensors_header for what the input is.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlcb_fuzz::safetensors_header(data);
});
