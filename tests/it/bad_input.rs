//! The bad-input catalogue, over a real socket: every malformed or hostile request gets its
//! documented status and a message a person can act on, nothing internal reaches the client,
//! and the server keeps serving.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use prost::Message as _;
use sqlx::PgPool;
use tonic::Code;
use user_rpc::pb::{self, Strategy};

use crate::support::{TestServer, context, seed};

/// Sends `payload` as one gRPC message to `path` with a plain HTTP/2 client and returns the
/// answer's grpc-status and grpc-message (from the headers or the trailers).
async fn raw_call(addr: std::net::SocketAddr, path: &str, payload: &[u8]) -> (i32, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(payload);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(ToString::to_string)
    };
    let code = field("grpc-status")
        .and_then(|c| c.parse().ok())
        .unwrap_or(-1);
    let message = field("grpc-message")
        .map(|m| percent_decode(&m))
        .unwrap_or_default();
    (code, message)
}

/// grpc-message is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn request(ids: Vec<i64>, strategy: i32) -> Vec<u8> {
    pb::BatchGetUsersRequest {
        ids,
        strategy,
        allow_missing: false,
    }
    .encode_to_vec()
}

/// Nothing that would tell a client about our internals.
fn assert_clean(case: &str, message: &str) {
    for leak in ["SELECT", "sqlx", "src/", ".rs:", "panicked", "backtrace"] {
        assert!(
            !message.contains(leak),
            "{case}: the message leaks {leak:?}: {message}"
        );
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn every_bad_request_gets_its_documented_status_and_the_server_keeps_serving(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let server = TestServer::start(context(&pool, |_| {})).await;
    let batch = "/user.v1.UserService/BatchGetUsers";
    let errgroup = Strategy::Errgroup as i32;
    // 600k ids of 9 varint bytes each: about 5.4 MB, over the 4 MiB limit.
    let oversized = request(vec![i64::MAX; 600_000], errgroup);
    let cases: Vec<(&str, &str, Vec<u8>, Code, &str)> = vec![
        (
            "empty ids",
            batch,
            request(vec![], errgroup),
            Code::InvalidArgument,
            "ids: must contain at least 1 id",
        ),
        (
            "an id of 0",
            batch,
            request(vec![0], errgroup),
            Code::InvalidArgument,
            "ids[0]: must be > 0, got 0",
        ),
        (
            "negative ids",
            batch,
            request(vec![5, -2], errgroup),
            Code::InvalidArgument,
            "ids[1]: must be > 0, got -2",
        ),
        (
            "i64::MAX",
            batch,
            request(vec![i64::MAX], errgroup),
            Code::NotFound,
            "user not found: ids 9223372036854775807",
        ),
        (
            "max_batch + 1 ids",
            batch,
            request((1..=1001).collect(), errgroup),
            Code::InvalidArgument,
            "must contain at most 1000 ids, got 1001",
        ),
        (
            "100k duplicates of one id",
            batch,
            request(vec![users[0].id; 100_000], errgroup),
            Code::InvalidArgument,
            "must contain at most 1000 ids, got 100000",
        ),
        (
            "an unknown strategy",
            batch,
            request(vec![1], 7),
            Code::InvalidArgument,
            "unknown strategy 7",
        ),
        (
            "a request over the 4 MiB limit",
            batch,
            oversized,
            Code::OutOfRange,
            "decoded message length too large",
        ),
        (
            "bytes that are not protobuf",
            batch,
            vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            Code::InvalidArgument,
            "not a valid BatchGetUsersRequest",
        ),
        (
            "an unknown method",
            "/user.v1.UserService/DeleteEverything",
            request(vec![1], 0),
            Code::Unimplemented,
            "",
        ),
    ];
    for (case, path, payload, code, message) in cases {
        let (got_code, got_message) = raw_call(server.addr, path, &payload).await;
        assert_eq!(got_code, code as i32, "{case}: {got_message}");
        assert!(
            got_message.contains(message),
            "{case}: {got_message:?} lacks {message:?}"
        );
        assert_clean(case, &got_message);
        // Still serving, after every one of them.
        let (ok, _) = raw_call(server.addr, batch, &request(vec![users[1].id], errgroup)).await;
        assert_eq!(ok, 0, "the server stopped serving after {case}");
    }
}
