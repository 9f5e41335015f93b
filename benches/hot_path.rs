//! Micro-benchmarks of the per-request pieces: token lookup, path check and
//! route classification, quota check-and-consume at 1, 100 and 10 000
//! accounts, and the request header rewrite. `cargo bench`.

use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use knoq_gateway::auth::{digest_hex, Principal, TokenTable};
use knoq_gateway::headers::{attach_identity, strip_client_identity, UpstreamAuth};
use knoq_gateway::quota::store::{StoreError, StoreFuture};
use knoq_gateway::quota::window::Window;
use knoq_gateway::quota::{Bucket, Demand, LocalStore, QuotaStore};
use knoq_gateway::route::classify;

fn token_lookup(c: &mut Criterion) {
    let tokens: Vec<([u8; 32], Principal, Option<u64>)> = (0..200)
        .map(|i| {
            let digest = digest_hex(&format!("kgw_token_{i}"));
            let mut sha = [0u8; 32];
            for (j, b) in sha.iter_mut().enumerate() {
                *b = u8::from_str_radix(&digest[2 * j..2 * j + 2], 16).unwrap();
            }
            let principal = Principal {
                token: format!("tool{i}").into(),
                user: format!("user{}", i % 50).into(),
                scim: false,
            };
            (sha, principal, None)
        })
        .collect();
    let table = TokenTable::new(tokens);
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer kgw_token_137"),
    );
    c.bench_function("token lookup (200 tokens)", |b| {
        b.iter(|| black_box(table.authenticate(black_box(&headers), || 0).is_ok()))
    });
}

fn route_classification(c: &mut Criterion) {
    let path = "/api/managed-agents/transcript";
    c.bench_function("path check + route classification", |b| {
        b.iter(|| black_box(classify(black_box(&Method::GET), black_box(path))))
    });
}

/// The store's answer, as the request path awaits it: the local store's
/// future is ready at its first poll, so no runtime is needed.
fn answered<T>(mut f: StoreFuture<'_, T>) -> Result<T, StoreError> {
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("the local store answers at once"),
    }
}

fn quota_check_and_consume(c: &mut Criterion) {
    let windows = vec![Window::parse("1000000000/min").unwrap()];
    let mut group = c.benchmark_group("quota check-and-consume");
    for users in [1usize, 100, 10_000] {
        let store = LocalStore::in_memory(250);
        let names: Vec<String> = (0..users).map(|i| format!("user{i}")).collect();
        // Every account has state already, as in a warm gateway.
        for n in &names {
            let d = Demand {
                user: n,
                token: "tool",
                bucket: Bucket::Read,
                user_windows: &windows,
                token_windows: &[],
            };
            answered(store.acquire(&d, 0)).unwrap().unwrap();
        }
        let mut i = 0usize;
        let mut now = 1u64;
        group.bench_with_input(BenchmarkId::from_parameter(users), &users, |b, _| {
            b.iter(|| {
                i = (i + 1) % users;
                now += 1;
                let d = Demand {
                    user: &names[i],
                    token: "tool",
                    bucket: Bucket::Read,
                    user_windows: &windows,
                    token_windows: &[],
                };
                black_box(answered(store.acquire(&d, now)).is_ok_and(|r| r.is_ok()))
            })
        });
    }
    group.finish();
}

fn header_rewrite(c: &mut Criterion) {
    let cookie =
        HeaderValue::from_static("knoq_session=abcdefghijklmnopqrstuvwxyz0123456789; theme=dark");
    let origin = HeaderValue::from_static("https://knoq.one");
    let mut template = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("authorization", "Bearer kgw_token_137"),
        ("user-agent", "reporting-service/1.2"),
        ("accept", "application/json"),
        ("x-request-id", "abc-123"),
        ("x-forwarded-for", "10.0.0.1"),
    ] {
        template.insert(k, HeaderValue::from_static(v));
    }
    c.bench_function("request header rewrite", |b| {
        b.iter(|| {
            let mut h = template.clone();
            strip_client_identity(&mut h);
            attach_identity(&mut h, UpstreamAuth::Cookie(&cookie), &origin);
            black_box(h)
        })
    });
}

criterion_group!(
    benches,
    token_lookup,
    route_classification,
    quota_check_and_consume,
    header_rewrite
);
criterion_main!(benches);
