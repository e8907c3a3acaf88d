//! Arbitrary SQL (lossily decoded, as the relay does) through the lexer and
//! classifier. Run: `cargo fuzz run classify -- -max_total_time=60`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    let write_functions = vec!["nextval".to_string(), "my_writer".to_string()];
    let a = pgfleet::router::classify::classify(&sql, &write_functions);
    let _ = a.has_session_effects();
});
