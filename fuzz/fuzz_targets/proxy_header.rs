//! The PROXY protocol header a TCP load balancer opens a connection with (v1 text, v2 binary),
//! framed on the stream by `comfy_wire::proxy_protocol::read_header` and parsed by `ppp`. No
//! input may panic; the reader never takes more than the specification's bounds, and what it
//! took parses to the same answer on its own.
#![no_main]

use comfy_wire::proxy_protocol::{MAX_V1_LENGTH, MAX_V2_LENGTH, parse, read_header};
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let Some(result) = read_header(&mut rest).now_or_never() else {
        panic!("reading from memory never waits");
    };
    let taken = data.len() - rest.len();
    assert!(taken <= MAX_V1_LENGTH.max(MAX_V2_LENGTH));
    if let Ok(header) = result {
        if data.starts_with(b"PROXY") {
            assert!(taken <= MAX_V1_LENGTH);
        }
        assert_eq!(parse(&data[..taken]).ok(), Some(header));
    }
    let _ = parse(data);
});
