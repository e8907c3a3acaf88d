//! Codec microbenchmark (no external harness): ns per call for framing and
//! decoding typical client messages. Run: `cargo bench --bench codec`.

use bytes::BytesMut;
use pgfleet::wire::{self, build};
use std::hint::black_box;
use std::time::Instant;

fn bench(name: &str, iters: u32, mut f: impl FnMut()) {
    for _ in 0..iters / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    println!("{name:40} {:8.1} ns/op", t.elapsed().as_nanos() as f64 / iters as f64);
}

fn main() {
    let mut q = BytesMut::new();
    build::query(&mut q, "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;");
    bench("split_message(Query)", 2_000_000, || {
        let mut b = q.clone();
        black_box(wire::split_message(&mut b, 1 << 20).unwrap());
    });
    let mut bind = BytesMut::new();
    build::bind(&mut bind, b"", b"P_0_1", b"\0\0\0\x01\0\0\0\x0512345\0\x01\0\0");
    bench("parse_bind", 2_000_000, || {
        black_box(wire::parse_bind(black_box(&bind)).unwrap());
    });
    let mut parse = BytesMut::new();
    build::parse(&mut parse, b"s1", b"SELECT * FROM t WHERE id = $1\0\0\x01\0\0\0\x17");
    bench("parse_parse", 2_000_000, || {
        black_box(wire::parse_parse(black_box(&parse)).unwrap());
    });
    bench("build ErrorResponse", 1_000_000, || {
        let mut b = BytesMut::with_capacity(128);
        build::error_response(&mut b, "ERROR", "53300", "no server connection available");
        black_box(b);
    });
}
