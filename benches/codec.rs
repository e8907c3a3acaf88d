//! Codec microbenchmarks (criterion): framing, decoding and encoding of the
//! messages on the hot path. Run: `cargo bench --bench codec`.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgfleet::wire::{self, build};

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let mut q = BytesMut::new();
    build::query(&mut q, "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;");
    g.bench_function("split_message(Query)", |b| {
        b.iter(|| {
            let mut buf = q.clone();
            black_box(wire::split_message(&mut buf, 1 << 20).unwrap());
        })
    });
    g.bench_function("peek_header(Query)", |b| b.iter(|| black_box(wire::peek_header(black_box(&q), 1 << 20).unwrap())));
    let mut bind = BytesMut::new();
    build::bind(&mut bind, b"", b"P_0_1", b"\0\0\0\x01\0\0\0\x0512345\0\x01\0\0");
    g.bench_function("parse_bind", |b| b.iter(|| black_box(wire::parse_bind(black_box(&bind)).unwrap())));
    let mut parse = BytesMut::new();
    build::parse(&mut parse, b"s1", b"SELECT * FROM t WHERE id = $1\0\0\x01\0\0\0\x17");
    g.bench_function("parse_parse", |b| b.iter(|| black_box(wire::parse_parse(black_box(&parse)).unwrap())));
    let mut err = BytesMut::new();
    build::error_response(&mut err, "ERROR", "53300", "no server connection available");
    g.bench_function("error_fields", |b| b.iter(|| black_box(wire::error_fields(black_box(&err)))));
    let mut status = BytesMut::new();
    build::parameter_status(&mut status, "application_name", "pgbench");
    g.bench_function("parse_parameter_status", |b| b.iter(|| black_box(wire::parse_parameter_status(black_box(&status)).unwrap())));
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    let mut out = BytesMut::with_capacity(4096);
    g.bench_function("ErrorResponse", |b| {
        b.iter(|| {
            out.clear();
            build::error_response(&mut out, "ERROR", "53300", "no server connection available");
            black_box(&out);
        })
    });
    g.bench_function("Query", |b| {
        b.iter(|| {
            out.clear();
            build::query(&mut out, black_box("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"));
            black_box(&out);
        })
    });
    g.bench_function("ReadyForQuery", |b| {
        b.iter(|| {
            out.clear();
            build::ready_for_query(&mut out, b'I');
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
