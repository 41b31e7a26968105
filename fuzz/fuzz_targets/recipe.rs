#![no_main]
//! cargo fuzz run recipe — see mlcb_fuzz::recipe for what the input is.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlcb_fuzz::recipe(data);
});
