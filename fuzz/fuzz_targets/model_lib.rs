#![no_main]
//! cargo fuzz run model_lib — see mlcb_fuzz::model_lib for what the input is.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlcb_fuzz::model_lib(data);
});
