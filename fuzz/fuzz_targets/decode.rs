//! Feeds arbitrary bytes to every client-message decoder and the startup
//! packet parser. Run: `cargo fuzz run decode -- -max_total_time=60`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgfleet::wire;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some((tag, msg))) = wire::split_message(&mut buf, 1 << 20) {
        match tag {
            b'P' => drop(wire::parse_parse(&msg)),
            b'B' => drop(wire::parse_bind(&msg)),
            b'D' | b'C' => drop(wire::parse_target(&msg)),
            _ => {
                let _ = wire::error_fields(&msg);
                let _ = wire::parse_parameter_status(&msg);
            }
        }
    }
    let mut buf = BytesMut::from(data);
    let _ = wire::startup::parse_startup(&mut buf);
    let _ = wire::startup::parse_options(&String::from_utf8_lossy(data));
});
